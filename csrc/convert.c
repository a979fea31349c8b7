/* Half-precision -> float32 conversion (bf16 and IEEE f16), used by the checkpoint loader
 * and by NF4 quantization of 16-bit inputs.  src (n,) uint16 bit patterns -> dst (n,) f32. */
#include "convert.h"

#include <string.h>
#if QX_X86
#include <immintrin.h>
#endif

float qx_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: normalise */
      int e = -1;
      do {
        man <<= 1;
        e++;
      } while (!(man & 0x400));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  union { uint32_t u; float f; } v;
  v.u = bits;
  return v.f;
}

#if QX_X86
QX_TARGET_AVX2 static void bf16_avx2(const uint16_t *s, float *d, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i))), 16);
    _mm256_storeu_ps(d + i, _mm256_castsi256_ps(w));
  }
  for (; i < i1; i++) d[i] = qx_bf16_to_f32(s[i]);
}
QX_TARGET_AVX2 static void f16_avx2(const uint16_t *s, float *d, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
  for (; i < i1; i++) d[i] = qx_f16_to_f32(s[i]);
}
#endif

int qx_half_to_f32(const uint16_t *src, int dtype, int64_t n, float *dst, int nthreads) {
  if (n < 0 || (dtype != QX_F16 && dtype != QX_BF16)) return QX_E_ARG;
  const int level = qx_cpu_level();
  const int64_t chunk = 1 << 16;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  int nt = qx_threads(nthreads);
  if (nchunks < 2) nt = 1;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t c = 0; c < nchunks; c++) {
    int64_t i0 = c * chunk, i1 = i0 + chunk < n ? i0 + chunk : n;
#if QX_X86
    if (level >= QX_LEVEL_AVX2) {
      if (dtype == QX_BF16) bf16_avx2(src, dst, i0, i1);
      else f16_avx2(src, dst, i0, i1);
      continue;
    }
#endif
    for (int64_t i = i0; i < i1; i++)
      dst[i] = dtype == QX_BF16 ? qx_bf16_to_f32(src[i]) : qx_f16_to_f32(src[i]);
  }
  return QX_OK;
}
