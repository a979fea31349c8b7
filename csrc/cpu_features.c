/* Run-time choice of the SIMD path: cpuid + the OS's register support (xgetbv), capped by
 * the QLORA_EXT_CPU environment variable.  Read once, cached; qx_cpu_refresh() re-reads. */
#include "qx_common.h"

#include <stdlib.h>
#include <string.h>

#if QX_X86
#include <cpuid.h>

static unsigned long long qx_xgetbv0(void) {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return ((unsigned long long)edx << 32) | eax;
}

static int detect_hw_level(void) {
  unsigned int a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return QX_LEVEL_SCALAR;
  int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
  if (!(osxsave && avx && fma && f16c)) return QX_LEVEL_SCALAR;
  unsigned long long xcr0 = qx_xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return QX_LEVEL_SCALAR; /* XMM and YMM state saved by the OS */
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return QX_LEVEL_SCALAR;
  int avx2 = (b >> 5) & 1;
  if (!avx2) return QX_LEVEL_SCALAR;
  int avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1,
      avx512vl = (b >> 31) & 1;
  int zmm_state = (xcr0 & 0xE0) == 0xE0; /* opmask + upper ZMM state */
  if (avx512f && avx512dq && avx512bw && avx512vl && zmm_state) {
    /* leaf 7 subleaf 1, EAX bit 5: AVX512_BF16 (vcvtne2ps2bf16, vdpbf16ps) */
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1)) return QX_LEVEL_AVX512_BF16;
    return QX_LEVEL_AVX512;
  }
  return QX_LEVEL_AVX2;
}
#elif QX_ARM64
static int detect_hw_level(void) { return QX_LEVEL_NEON; }
#else
static int detect_hw_level(void) { return QX_LEVEL_SCALAR; }
#endif

static int hw_level = -1;
static int active_level = -1;

static int level_from_name(const char *s) {
  if (!s || !*s) return -1;
  if (!strcmp(s, "scalar")) return QX_LEVEL_SCALAR;
  if (!strcmp(s, "avx2")) return QX_LEVEL_AVX2;
  if (!strcmp(s, "avx512")) return QX_LEVEL_AVX512;
  if (!strcmp(s, "avx512_bf16")) return QX_LEVEL_AVX512_BF16;
  if (!strcmp(s, "neon")) return QX_LEVEL_NEON;
  return -1;
}

void qx_cpu_refresh(void) {
  if (hw_level < 0) hw_level = detect_hw_level();
  int lvl = hw_level;
  int cap = level_from_name(getenv("QLORA_EXT_CPU"));
  if (cap == QX_LEVEL_SCALAR) lvl = QX_LEVEL_SCALAR;
  else if (cap >= 0 && hw_level != QX_LEVEL_NEON && cap != QX_LEVEL_NEON && cap < lvl) lvl = cap;
  active_level = lvl;
}

int qx_cpu_level(void) {
  if (active_level < 0) qx_cpu_refresh();
  return active_level;
}

int qx_cpu_hw_level(void) {
  if (hw_level < 0) qx_cpu_refresh();
  return hw_level;
}

const char *qx_cpu_level_name(int level) {
  switch (level) {
    case QX_LEVEL_AVX2: return "avx2";
    case QX_LEVEL_AVX512: return "avx512";
    case QX_LEVEL_AVX512_BF16: return "avx512_bf16";
    case QX_LEVEL_NEON: return "neon";
    default: return "scalar";
  }
}
