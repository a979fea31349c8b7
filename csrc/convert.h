#ifndef QX_CONVERT_H
#define QX_CONVERT_H
#include "qx_common.h"
/* src (n,) bf16 or f16 bit patterns (dtype QX_BF16 / QX_F16) -> dst (n,) float32. */
int qx_half_to_f32(const uint16_t *src, int dtype, int64_t n, float *dst, int nthreads);
#endif
