/* NF4 quantize / dequantize.  Numerics follow bitsandbytes' quantize_4bit (nf4):
 *  - full block:  scale = 1 / max(absmax, 1e-38) (float32), v = clamp(x * scale, -1, 1)
 *  - short block: am = max(absmax, 1e-38), v = clamp(x / am, -1, 1), absmax stored = am
 *  - code = number of midpoints (float32 (c[i] + c[i+1]) / 2) strictly below v, so a value
 *    exactly on a midpoint takes the lower code; an odd-length tensor pads with 0 (code 7).
 * Dequantize: code[nibble] * absmax[block] in float32, as bitsandbytes does. */
#include "nf4.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if QX_X86
#include <immintrin.h>
#endif

const float qx_nf4_code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

static float nf4_mid[15];
static int nf4_mid_ready = 0;

static void nf4_init_midpoints(void) {
  if (nf4_mid_ready) return;
  for (int i = 0; i < 15; i++) {
    volatile float s = qx_nf4_code[i] + qx_nf4_code[i + 1]; /* float32 sum, then halve */
    nf4_mid[i] = s / 2.0f;
  }
  nf4_mid_ready = 1;
}

static inline uint8_t nf4_code_of(float v) {
  uint8_t c = 0;
  for (int i = 0; i < 15; i++) c += (uint8_t)(nf4_mid[i] < v);
  return c;
}

static inline float clamp1(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

static const float QX_ABSMAX_FLOOR = 1e-38f;

/* ---- load one block as float32 into buf ---------------------------------------------- */
static void load_block_scalar(const void *x, int dtype, int64_t start, int64_t len, float *buf) {
  if (dtype == QX_F32) {
    memcpy(buf, (const float *)x + start, (size_t)len * sizeof(float));
  } else if (dtype == QX_BF16) {
    const uint16_t *h = (const uint16_t *)x + start;
    for (int64_t i = 0; i < len; i++) buf[i] = qx_bf16_to_f32(h[i]);
  } else {
    const uint16_t *h = (const uint16_t *)x + start;
    for (int64_t i = 0; i < len; i++) buf[i] = qx_f16_to_f32(h[i]);
  }
}

/* Returns the index within the block of the first non-finite value, or -1. */
static int64_t first_nonfinite(const float *buf, int64_t len) {
  for (int64_t i = 0; i < len; i++)
    if (!isfinite(buf[i])) return i;
  return -1;
}

/* ---- scalar block quantizer -------------------------------------------------------- */
static float block_absmax_scalar(const float *buf, int64_t len) {
  float m = 0.0f;
  for (int64_t i = 0; i < len; i++) {
    float a = fabsf(buf[i]);
    m = a > m ? a : m;
  }
  return m;
}

/* codes[i] for i < len; full block multiplies by the reciprocal, a short one divides. */
static void block_codes_scalar(const float *buf, int64_t len, float am, int full, uint8_t *codes) {
  if (full) {
    float s = 1.0f / (am > QX_ABSMAX_FLOOR ? am : QX_ABSMAX_FLOOR);
    for (int64_t i = 0; i < len; i++) codes[i] = nf4_code_of(clamp1(buf[i] * s));
  } else {
    for (int64_t i = 0; i < len; i++) codes[i] = nf4_code_of(clamp1(buf[i] / am));
  }
}

#if QX_X86
/* ---- AVX2 --------------------------------------------------------------------------- */
QX_TARGET_AVX2 static void load_block_avx2(const void *x, int dtype, int64_t start, int64_t len,
                                           float *buf) {
  int64_t i = 0;
  if (dtype == QX_F32) {
    memcpy(buf, (const float *)x + start, (size_t)len * sizeof(float));
    return;
  }
  const uint16_t *h = (const uint16_t *)x + start;
  if (dtype == QX_BF16) {
    for (; i + 8 <= len; i += 8) {
      __m128i v = _mm_loadu_si128((const __m128i *)(h + i));
      __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16);
      _mm256_storeu_ps(buf + i, _mm256_castsi256_ps(w));
    }
    for (; i < len; i++) buf[i] = qx_bf16_to_f32(h[i]);
  } else {
    for (; i + 8 <= len; i += 8)
      _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < len; i++) buf[i] = qx_f16_to_f32(h[i]);
  }
}

/* The vector absmax functions take the unsigned max of the |x| bit patterns: the same as the
   float max for finite values, and a NaN or an infinity (bits >= 0x7f800000) makes the result
   non-finite, so one pass both scales the block and screens it. */
static inline uint32_t abs_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u & 0x7fffffffu;
}

static inline float float_of_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

QX_TARGET_AVX2 static float block_absmax_avx2(const float *buf, int64_t len) {
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  __m256i m = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(buf + i)), absmask));
  uint32_t t[8], r = 0;
  _mm256_storeu_si256((__m256i *)t, m);
  for (int k = 0; k < 8; k++) r = t[k] > r ? t[k] : r;
  for (; i < len; i++) r = abs_bits(buf[i]) > r ? abs_bits(buf[i]) : r;
  return float_of_bits(r);
}

/* Full blocks only (len a multiple of 32, blocksize >= 32). */
QX_TARGET_AVX2 static void block_pack_full_avx2(const float *buf, int64_t len, float am,
                                                uint8_t *packed) {
  __m256 s = _mm256_set1_ps(1.0f / (am > QX_ABSMAX_FLOOR ? am : QX_ABSMAX_FLOOR));
  __m256 lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f);
  __m256 mids[15];
  for (int k = 0; k < 15; k++) mids[k] = _mm256_set1_ps(nf4_mid[k]);
  const __m128i pairw = _mm_set1_epi16(0x0110); /* bytes (16, 1): hi*16 + lo */
  for (int64_t i = 0; i < len; i += 16) {
    __m256i c[2];
    for (int h = 0; h < 2; h++) {
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(buf + i + 8 * h), s);
      v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
      __m256i cnt = _mm256_setzero_si256();
      /* compare gives -1 per lane where mid < v; subtracting counts them */
      for (int k = 0; k < 15; k++)
        cnt = _mm256_sub_epi32(cnt, _mm256_castps_si256(_mm256_cmp_ps(mids[k], v, _CMP_LT_OQ)));
      c[h] = cnt;
    }
    /* 16 int32 codes -> 16 bytes -> 8 packed bytes */
    __m256i w16 = _mm256_packus_epi32(c[0], c[1]);            /* lanes: c0[0..3] c1[0..3] | c0[4..7] c1[4..7] */
    w16 = _mm256_permute4x64_epi64(w16, 0xD8);                 /* c0[0..7] c1[0..7] */
    __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
    __m128i p = _mm_maddubs_epi16(b, pairw);                   /* 8 x int16: c[2j]*16 + c[2j+1] */
    p = _mm_packus_epi16(p, p);
    _mm_storel_epi64((__m128i *)(packed + i / 2), p);
  }
}

/* 32 outputs from 16 packed bytes; all 32 belong to one block (blocksize >= 32). */
QX_TARGET_AVX2 static void dequant_avx2(const uint8_t *packed, const float *absmax, int64_t n,
                                        int64_t blocksize, int64_t e0, int64_t e1, float *out,
                                        int stream) {
  __m256 lut_lo = _mm256_loadu_ps(qx_nf4_code), lut_hi = _mm256_loadu_ps(qx_nf4_code + 8);
  __m128i mask4 = _mm_set1_epi8(0x0F);
  __m256i seven = _mm256_set1_epi32(7);
  int64_t e = e0;
  for (; e + 32 <= e1; e += 32) {
    __m256 a = _mm256_set1_ps(absmax[e / blocksize]);
    __m128i b = _mm_loadu_si128((const __m128i *)(packed + e / 2));
    __m128i hn = _mm_and_si128(_mm_srli_epi16(b, 4), mask4), ln = _mm_and_si128(b, mask4);
    __m128i q0 = _mm_unpacklo_epi8(hn, ln), q1 = _mm_unpackhi_epi8(hn, ln);
    __m128i qs[4] = {q0, _mm_srli_si128(q0, 8), q1, _mm_srli_si128(q1, 8)};
    for (int k = 0; k < 4; k++) {
      __m256i idx = _mm256_cvtepu8_epi32(qs[k]);
      __m256 vlo = _mm256_permutevar8x32_ps(lut_lo, idx);
      __m256 vhi = _mm256_permutevar8x32_ps(lut_hi, idx);
      __m256 v = _mm256_blendv_ps(vlo, vhi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
      v = _mm256_mul_ps(v, a);
      if (stream) {
        _mm_stream_ps(out + e + 8 * k, _mm256_castps256_ps128(v));
        _mm_stream_ps(out + e + 8 * k + 4, _mm256_extractf128_ps(v, 1));
      } else {
        _mm256_storeu_ps(out + e + 8 * k, v);
      }
    }
  }
  for (; e < e1; e++) {
    uint8_t byte = packed[e / 2];
    uint8_t q = (e & 1) ? (byte & 0x0F) : (byte >> 4);
    out[e] = qx_nf4_code[q] * absmax[e / blocksize];
  }
  (void)n;
}

/* ---- AVX-512 ------------------------------------------------------------------------ */
QX_TARGET_AVX512 static float block_absmax_avx512(const float *buf, int64_t len) {
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  __m512i m = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_loadu_si512(buf + i), absmask));
  uint32_t r = _mm512_reduce_max_epu32(m);
  for (; i < len; i++) r = abs_bits(buf[i]) > r ? abs_bits(buf[i]) : r;
  return float_of_bits(r);
}

QX_TARGET_AVX512 static void block_pack_full_avx512(const float *buf, int64_t len, float am,
                                                    uint8_t *packed) {
  __m512 s = _mm512_set1_ps(1.0f / (am > QX_ABSMAX_FLOOR ? am : QX_ABSMAX_FLOOR));
  __m512 lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
  __m512i one = _mm512_set1_epi32(1);
  const __m128i pairw = _mm_set1_epi16(0x0110);
  for (int64_t i = 0; i < len; i += 16) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(buf + i), s);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    __m512i cnt = _mm512_setzero_si512();
    for (int k = 0; k < 15; k++) {
      __mmask16 m = _mm512_cmp_ps_mask(_mm512_set1_ps(nf4_mid[k]), v, _CMP_LT_OQ);
      cnt = _mm512_mask_add_epi32(cnt, m, cnt, one);
    }
    __m128i b = _mm512_cvtepi32_epi8(cnt);
    __m128i p = _mm_maddubs_epi16(b, pairw);
    p = _mm_packus_epi16(p, p);
    _mm_storel_epi64((__m128i *)(packed + i / 2), p);
  }
}

/* Non-temporal store of 16 floats to a 16-byte aligned address (numpy's guarantee): whole
   cache lines still fill the write-combining buffers, and skipping the read-for-ownership
   of the destination roughly halves the traffic of a large dequantize. */
QX_TARGET_AVX512 static inline void stream16_avx512(float *p, __m512 v) {
  _mm_stream_ps(p, _mm512_castps512_ps128(v));
  _mm_stream_ps(p + 4, _mm512_extractf32x4_ps(v, 1));
  _mm_stream_ps(p + 8, _mm512_extractf32x4_ps(v, 2));
  _mm_stream_ps(p + 12, _mm512_extractf32x4_ps(v, 3));
}

QX_TARGET_AVX512 static void dequant_avx512(const uint8_t *packed, const float *absmax, int64_t n,
                                            int64_t blocksize, int64_t e0, int64_t e1, float *out,
                                            int stream) {
  __m512 lut = _mm512_loadu_ps(qx_nf4_code);
  __m128i mask4 = _mm_set1_epi8(0x0F);
  int64_t e = e0;
  for (; e + 32 <= e1; e += 32) {
    __m512 a = _mm512_set1_ps(absmax[e / blocksize]);
    __m128i b = _mm_loadu_si128((const __m128i *)(packed + e / 2));
    __m128i hn = _mm_and_si128(_mm_srli_epi16(b, 4), mask4), ln = _mm_and_si128(b, mask4);
    __m512i i0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hn, ln));
    __m512i i1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hn, ln));
    __m512 v0 = _mm512_mul_ps(_mm512_permutexvar_ps(i0, lut), a);
    __m512 v1 = _mm512_mul_ps(_mm512_permutexvar_ps(i1, lut), a);
    if (stream) {
      stream16_avx512(out + e, v0);
      stream16_avx512(out + e + 16, v1);
    } else {
      _mm512_storeu_ps(out + e, v0);
      _mm512_storeu_ps(out + e + 16, v1);
    }
  }
  for (; e < e1; e++) {
    uint8_t byte = packed[e / 2];
    uint8_t q = (e & 1) ? (byte & 0x0F) : (byte >> 4);
    out[e] = qx_nf4_code[q] * absmax[e / blocksize];
  }
  (void)n;
}
#endif /* QX_X86 */

static void dequant_scalar(const uint8_t *packed, const float *absmax, int64_t n,
                           int64_t blocksize, int64_t e0, int64_t e1, float *out) {
  for (int64_t e = e0; e < e1; e++) {
    uint8_t byte = packed[e / 2];
    uint8_t q = (e & 1) ? (byte & 0x0F) : (byte >> 4);
    out[e] = qx_nf4_code[q] * absmax[e / blocksize];
  }
  (void)n;
}

static int valid_blocksize(int64_t bs) { return bs >= 32 && bs <= 4096 && (bs & (bs - 1)) == 0; }

int qx_nf4_quantize(const void *x, int dtype, int64_t n, int64_t blocksize, uint8_t *packed,
                    float *absmax, int nthreads, int64_t *bad_index) {
  if (n < 0 || !valid_blocksize(blocksize)) return QX_E_ARG;
  if (dtype != QX_F32 && dtype != QX_F16 && dtype != QX_BF16) return QX_E_ARG;
  nf4_init_midpoints();
  const int level = qx_cpu_level();
  const int64_t nblocks = n / blocksize + (n % blocksize != 0);
  int64_t first_bad = -1;
  int nt = qx_threads(nthreads);
  if (nblocks < 4 * nt) nt = 1; /* tiny tensors: thread start-up costs more than the work */

#pragma omp parallel num_threads(nt)
  {
    float buf[4096];
    uint8_t codes[4096 + 1];
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; blk++) {
      int64_t start = blk * blocksize;
      int64_t len = n - start < blocksize ? n - start : blocksize;
      int full = len == blocksize;
#if QX_X86
      if (level >= QX_LEVEL_AVX2) load_block_avx2(x, dtype, start, len, buf);
      else
#endif
        load_block_scalar(x, dtype, start, len, buf);
      float am;
#if QX_X86
      if (level >= QX_LEVEL_AVX512) am = block_absmax_avx512(buf, len);
      else if (level >= QX_LEVEL_AVX2) am = block_absmax_avx2(buf, len);
      else
#endif
        am = first_nonfinite(buf, len) >= 0 ? NAN : block_absmax_scalar(buf, len);
      if (!isfinite(am)) {
        int64_t bad = first_nonfinite(buf, len);
#pragma omp critical
        if (first_bad < 0 || start + bad < first_bad) first_bad = start + bad;
        continue;
      }
      if (!full && am < QX_ABSMAX_FLOOR) am = QX_ABSMAX_FLOOR;
      absmax[blk] = am;
      /* start is even (blocksize >= 32), so this block owns whole bytes, except an odd
         final element which pairs with the zero pad. */
#if QX_X86
      if (full && level >= QX_LEVEL_AVX512) {
        block_pack_full_avx512(buf, len, am, packed + start / 2);
        continue;
      }
      if (full && level >= QX_LEVEL_AVX2) {
        block_pack_full_avx2(buf, len, am, packed + start / 2);
        continue;
      }
#endif
      block_codes_scalar(buf, len, am, full, codes);
      if (len & 1) codes[len] = nf4_code_of(0.0f);
      for (int64_t i = 0; i < (len + 1) / 2; i++)
        packed[start / 2 + i] = (uint8_t)((codes[2 * i] << 4) | codes[2 * i + 1]);
    }
  }
  if (first_bad >= 0) {
    if (bad_index) *bad_index = first_bad;
    return QX_E_NONFINITE;
  }
  return QX_OK;
}

int qx_nf4_dequantize(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                      float *out, int nthreads) {
  if (n < 0 || !valid_blocksize(blocksize)) return QX_E_ARG;
  const int level = qx_cpu_level();
  /* Chunks of whole 32-element groups so every thread runs the vector loop. */
  const int64_t chunk = 1 << 16;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  int nt = qx_threads(nthreads);
  if (nchunks < 2) nt = 1;
  /* Outputs larger than the caches bypass them; smaller ones stay cached for the GEMM that
     usually reads them next. */
  const int stream = (n * 4 > (64 << 20)) && (((uintptr_t)out & 15) == 0);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t c = 0; c < nchunks; c++) {
    int64_t e0 = c * chunk, e1 = e0 + chunk < n ? e0 + chunk : n;
#if QX_X86
    if (level >= QX_LEVEL_AVX512) dequant_avx512(packed, absmax, n, blocksize, e0, e1, out, stream);
    else if (level >= QX_LEVEL_AVX2) dequant_avx2(packed, absmax, n, blocksize, e0, e1, out, stream);
    else
#endif
      dequant_scalar(packed, absmax, n, blocksize, e0, e1, out);
  }
#if QX_X86
  if (stream && level >= QX_LEVEL_AVX2) _mm_sfence();
#endif
  return QX_OK;
}

/* bitsandbytes' CPU 8-bit quantizer maps v in [-1, 1] onto a 65536-point grid,
 * idx = (int)((v + 1) * 0.5 * 65535 + 0.5) in float32, and takes the code nearest to that
 * grid point (ties to the lower code); replicating the grid reproduces its codes exactly.
 * The code is sorted, so the nearest code only moves up as the grid point does: one merge
 * pass, stepping to the next larger code value (the first of any run of equal ones) only
 * while it is strictly nearer. */
static void blockwise8_lut(const float *code, uint8_t *lut) {
  int bi = 0;
  for (int g = 0; g < 65536; g++) {
    const double v = (double)g / 65535.0 * 2.0 - 1.0;
    for (;;) {
      int j = bi + 1;
      while (j < 256 && code[j] == code[bi]) j++;
      if (j >= 256 || !(fabs(v - (double)code[j]) < fabs(v - (double)code[bi]))) break;
      bi = j;
    }
    lut[g] = (uint8_t)bi;
  }
}

int qx_blockwise8_quantize(const float *x, int64_t n, int64_t blocksize, const float *code,
                           uint8_t *out, float *absmax) {
  if (n < 0 || blocksize <= 0) return QX_E_ARG;
  for (int c = 0; c < 255; c++)
    if (!(code[c] <= code[c + 1])) return QX_E_ARG; /* the LUT's merge needs a sorted code */
  if (first_nonfinite(x, n) >= 0) return QX_E_NONFINITE; /* the grid index below needs finite v */
  /* per call, not static: two threads may quantize at once (the GIL is released) */
  uint8_t *lut = (uint8_t *)malloc(65536);
  if (!lut) return QX_E_NOMEM;
  blockwise8_lut(code, lut);
  const int64_t nblocks = n / blocksize + (n % blocksize != 0);
  for (int64_t blk = 0; blk < nblocks; blk++) {
    int64_t start = blk * blocksize, len = n - start < blocksize ? n - start : blocksize;
    float am = block_absmax_scalar(x + start, len);
    absmax[blk] = am;
    if (am == 0.0f) {
      memset(out + start, 0, (size_t)len);
      continue;
    }
    float inv = 1.0f / am;
    for (int64_t i = 0; i < len; i++) {
      float v = clamp1(x[start + i] * inv);
      out[start + i] = lut[(uint16_t)((v + 1.0f) * 0.5f * 65535.0f + 0.5f)];
    }
  }
  free(lut);
  return QX_OK;
}
