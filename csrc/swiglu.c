/* SwiGLU forward and backward; see swiglu.h.  One pass over memory each (numpy's version made
 * six to twelve), threaded over contiguous ranges. */
#include "swiglu.h"

#include <math.h>

#include "vexp.h"

/* below this many elements one thread does it all (a fork/join costs a few microseconds) */
#define SWIGLU_MIN_PER_THREAD 32768

static inline float sigmoid_scalar(float g) {
  float t = expf(-fabsf(g));
  return g >= 0.0f ? 1.0f / (1.0f + t) : t / (1.0f + t);
}

static int threads_for(int64_t n, int nthreads) {
  int nt = qx_threads(nthreads);
  int64_t most = n / SWIGLU_MIN_PER_THREAD;
  if (most < 1) most = 1;
  return nt > most ? (int)most : nt;
}

#if QX_X86
QX_TARGET_AVX512 static inline __m512 sigmoid16(__m512 g) {
  const __m512 t = qx_exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), t));
  const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_mul_ps(inv, neg, inv, t);
}

QX_TARGET_AVX512 static void forward_avx512(const float *g, const float *u, float *m, int64_t i0,
                                            int64_t i1) {
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    _mm512_storeu_ps(m + i, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid16(gv)), _mm512_loadu_ps(u + i)));
  }
  for (; i < i1; i++) m[i] = g[i] * sigmoid_scalar(g[i]) * u[i];
}

QX_TARGET_AVX512 static void backward_avx512(const float *g, const float *u, const float *dm,
                                             float *dg, float *du, int64_t i0, int64_t i1) {
  const __m512 one = _mm512_set1_ps(1.0f);
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i), s = sigmoid16(gv), d = _mm512_loadu_ps(dm + i);
    _mm512_storeu_ps(du + i, _mm512_mul_ps(_mm512_mul_ps(d, gv), s));
    const __m512 k = _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one);
    _mm512_storeu_ps(dg + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(d, _mm512_loadu_ps(u + i)), s), k));
  }
  for (; i < i1; i++) {
    const float s = sigmoid_scalar(g[i]);
    du[i] = dm[i] * g[i] * s;
    dg[i] = dm[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
  }
}
#endif

static void forward_scalar(const float *g, const float *u, float *m, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i++) m[i] = g[i] * sigmoid_scalar(g[i]) * u[i];
}

static void backward_scalar(const float *g, const float *u, const float *dm, float *dg, float *du,
                            int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i++) {
    const float s = sigmoid_scalar(g[i]);
    du[i] = dm[i] * g[i] * s;
    dg[i] = dm[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
  }
}

/* Both directions over contiguous ranges of the n elements, one range per thread; dm NULL
   means the forward (out0 = m), otherwise the backward (out0 = dg, out1 = du). */
static int run(const float *g, const float *u, const float *dm, float *out0, float *out1,
               int64_t n, int nthreads) {
  if (n < 0) return QX_E_SIZE;
  const int nt = threads_for(n, nthreads);
  const int vec = QX_X86 && qx_cpu_level() >= QX_LEVEL_AVX512;
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
    const int t = 0, T = 1;
#endif
    const int64_t i0 = n * t / T, i1 = n * (t + 1) / T;
#if QX_X86
    if (vec) {
      if (dm) backward_avx512(g, u, dm, out0, out1, i0, i1);
      else forward_avx512(g, u, out0, i0, i1);
    } else
#endif
    {
      if (dm) backward_scalar(g, u, dm, out0, out1, i0, i1);
      else forward_scalar(g, u, out0, i0, i1);
    }
  }
  (void)vec;
  return QX_OK;
}

int qx_swiglu_forward(const float *g, const float *u, float *m, int64_t n, int nthreads) {
  return run(g, u, NULL, m, NULL, n, nthreads);
}

int qx_swiglu_backward(const float *g, const float *u, const float *dm, float *dg, float *du,
                       int64_t n, int nthreads) {
  return run(g, u, dm, dg, du, n, nthreads);
}
