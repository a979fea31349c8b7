/* exp(x) on 16 float32 lanes (AVX-512), shared by the element-wise kernels.
 *
 * x = n ln2 + r with n = round(x / ln2) and |r| <= ln2/2 (ln2 split in a high part exact in
 * float32 and a low part, so n ln2_hi is exact); e^r by its Taylor polynomial to degree 7 in
 * Horner form (truncation below 2e-9 relative), scaled by 2^n with vscalefps, which gives
 * 0 below the float32 range and inf above it.  Within 2 ulp of expf; NaN stays NaN. */
#ifndef QX_VEXP_H
#define QX_VEXP_H
#include "qx_common.h"

#if QX_X86
#include <immintrin.h>

QX_TARGET_AVX512 static inline __m512 qx_exp16(__m512 x) {
  /* maxps/minps return their second operand when either is NaN: x goes second */
  x = _mm512_min_ps(_mm512_set1_ps(128.0f), _mm512_max_ps(_mm512_set1_ps(-160.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif
#endif
