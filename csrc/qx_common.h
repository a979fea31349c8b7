/* Shared declarations of the qlora_ext C kernels.
 *
 * Every kernel has a scalar version and, on x86-64, AVX2 and AVX-512 versions compiled with
 * per-function target attributes, so one binary runs on any x86-64 CPU.  qx_cpu_level() says
 * which path the dispatchers take; QLORA_EXT_CPU=scalar|avx2|avx512|avx512_bf16 caps it (for
 * tests).
 * Kernels return QX_OK or a negative QX_E* code; they check sizes before touching memory. */
#ifndef QX_COMMON_H
#define QX_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* AVX512_BF16 is AVX512 plus vdpbf16ps; it sorts above AVX512 so `level >= QX_LEVEL_AVX512`
   holds for it (all x86 comparisons are inside QX_X86 blocks, where NEON never occurs). */
enum { QX_LEVEL_SCALAR = 0, QX_LEVEL_AVX2 = 1, QX_LEVEL_AVX512 = 2, QX_LEVEL_NEON = 3,
       QX_LEVEL_AVX512_BF16 = 4 };
enum { QX_OK = 0, QX_E_NONFINITE = -1, QX_E_SIZE = -2, QX_E_ARG = -3, QX_E_NOMEM = -4 };
enum { QX_F32 = 0, QX_F16 = 1, QX_BF16 = 2 };

#if defined(__x86_64__) || defined(_M_X64)
#define QX_X86 1
#define QX_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QX_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#else
#define QX_X86 0
#endif
#if defined(__aarch64__)
#define QX_ARM64 1
#else
#define QX_ARM64 0
#endif

/* Path the dispatchers use now (hardware level capped by QLORA_EXT_CPU). */
int qx_cpu_level(void);
/* Best level the hardware and OS support, ignoring the cap. */
int qx_cpu_hw_level(void);
/* Re-read QLORA_EXT_CPU (tests change it between calls). */
void qx_cpu_refresh(void);
const char *qx_cpu_level_name(int level);

/* OpenMP thread count to use: n > 0 as given, otherwise all cores; never more than
 * QX_THREADS_PER_CPU per core (the Python layer cuts counts down the same way), since tens of
 * thousands of threads exhaust the process's thread and stack limits and libgomp aborts. */
enum { QX_THREADS_PER_CPU = 4 };
static inline int qx_threads(int n) {
#ifdef _OPENMP
  const int procs = omp_get_num_procs();
  const int cap = procs > 0 && procs < (1 << 20) ? QX_THREADS_PER_CPU * procs : 1;
  return n > 0 ? (n < cap ? n : cap) : (procs > 0 ? procs : 1);
#else
  (void)n;
  return 1;
#endif
}

/* bf16 / f16 -> f32 for one value (scalar paths and tails). */
static inline float qx_bf16_to_f32(uint16_t h) {
  union { uint32_t u; float f; } v;
  v.u = (uint32_t)h << 16;
  return v.f;
}
float qx_f16_to_f32(uint16_t h);

#endif
