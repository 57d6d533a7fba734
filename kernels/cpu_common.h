/* Helpers shared by the CPU kernels (cpu_attention.c, cpu_ops.c): bfloat16 <-> float32, and an exp that
 * vectorises. */
#ifndef BATCHLLM_CPU_COMMON_H
#define BATCHLLM_CPU_COMMON_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN kept NaN */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0 in plain arithmetic, so that loops over it vectorise: 2^y = 2^n * 2^f, f in [-0.5, 0.5],
 * 2^f by its Taylor series to degree 7 (relative error < 1e-8, below float rounding); 0 below 2^-126. */
static inline float exp_nonpos(float x) {
  float y = x * 1.4426950408889634f;
  const float zero = y < -126.0f ? 0.0f : 1.0f; /* below float's normal range: 0 */
  y = y < -126.0f ? -126.0f : y;
  float n = (y + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 drops the fraction */
  float f = (y - n) * 0.6931471805599453f;
  float p = 1.9841269841269841e-4f;
  p = p * f + 1.3888888888888889e-3f;
  p = p * f + 8.3333333333333333e-3f;
  p = p * f + 4.1666666666666667e-2f;
  p = p * f + 1.6666666666666667e-1f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
  float s;
  memcpy(&s, &bits, 4);
  return p * s * zero;
}

#endif
