/* RMSNorm (with the residual add) and rotary for the CPU, one pass each, with the arithmetic of their torch
 * versions in batchllm/layers/fused.py: math in float32, and a rounding to the tensor dtype wherever torch
 * rounds (after each op). Also the paged-cache write. dtype: 0 = float32, 1 = bfloat16. Built by kernels/cpu.py.
 *
 * Rows may be strided (a row stride in elements is passed); the last dimension is contiguous.
 */
/* torch rounds every product before the add that follows it: no fused multiply-adds here */
#pragma GCC optimize("fp-contract=off")

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_common.h"

static inline float ld(const void *p, int64_t i, int dtype) {
  return dtype == 1 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int64_t i, float v, int dtype) {
  if (dtype == 1) ((uint16_t *)p)[i] = f32_to_bf16(v);
  else ((float *)p)[i] = v;
}

/* the value as the tensor dtype holds it: what torch's per-op rounding leaves */
static inline float rnd(float v, int dtype) { return dtype == 1 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* out = RMSNorm(x (+ residual)) * weight; with a residual, residual_out = x + residual (rounded to dtype).
 * HF's order: h = float(x); h * rsqrt(mean(h^2) + eps), rounded to dtype, then times weight (rounded). */
#define MAX_HIDDEN 16384
#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE void rms_norm_row(const void *x, int64_t x_stride, const void *residual, int64_t r_stride,
                                const void *weight, void *out, void *residual_out, int64_t r, int n, float eps,
                                const int dtype) {
  {
    float h[MAX_HIDDEN];
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) {
      float v = ld(x, r * x_stride + i, dtype);
      if (residual) v = rnd(v + ld(residual, r * r_stride + i, dtype), dtype);
      h[i] = v;
      ss += v * v;
    }
    if (residual_out)
      for (int i = 0; i < n; i++) st(residual_out, r * n + i, h[i], dtype);
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) st(out, r * n + i, ld(weight, i, dtype) * rnd(h[i] * inv, dtype), dtype);
  }
}

void rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t r_stride, const void *weight,
              void *out, void *residual_out, int64_t rows, int hidden, float eps, int dtype) {
#pragma omp parallel for schedule(static) if (rows * hidden > 65536)
  for (int64_t r = 0; r < rows; r++) {
    if (dtype == 1) rms_norm_row(x, x_stride, residual, r_stride, weight, out, residual_out, r, hidden, eps, 1);
    else rms_norm_row(x, x_stride, residual, r_stride, weight, out, residual_out, r, hidden, eps, 0);
  }
}

/* out [rows, heads, d] = x * cos + roll(x, d / 2) * sin, cos/sin [rows, d] (sin sign-folded, see rotary.py) */
ALWAYS_INLINE void rotary_row(const void *x, int64_t x_stride, const void *cos, const void *sin, void *out,
                              int64_t r, int heads, int d, const int dtype) {
  const int half = d / 2;
  for (int h = 0; h < heads; h++) {
    const int64_t xi = r * x_stride + (int64_t)h * d, oi = (r * heads + h) * d;
    for (int k = 0; k < 2; k++) { /* the two halves: roll by half reads the other one */
      const int lo = k * half, shift = k ? -half : half;
#pragma omp simd
      for (int i = lo; i < lo + half; i++) {
        const float a = rnd(ld(x, xi + i, dtype) * ld(cos, r * d + i, dtype), dtype);
        const float b = rnd(ld(x, xi + i + shift, dtype) * ld(sin, r * d + i, dtype), dtype);
        st(out, oi + i, a + b, dtype);
      }
    }
  }
}

void rotary(const void *x, int64_t x_stride, const void *cos, const void *sin, void *out, int64_t rows, int heads,
            int d, int dtype) {
#pragma omp parallel for schedule(static) if (rows * heads * d > 65536)
  for (int64_t r = 0; r < rows; r++) {
    if (dtype == 1) rotary_row(x, x_stride, cos, sin, out, r, heads, d, 1);
    else rotary_row(x, x_stride, cos, sin, out, r, heads, d, 0);
  }
}

/* key/value [tokens, kv_heads, d] (token stride given) -> the caches' slots; slot -1 is skipped. The key cache is
 * [num_blocks, kv_heads, d, block_size] (K transposed within a block, cpu_attention.c), the value cache
 * [num_blocks, block_size, kv_heads, d]. */
void reshape_and_cache(const void *key, int64_t k_stride, const void *value, int64_t v_stride, void *key_cache,
                       void *value_cache, const int64_t *slot_mapping, int64_t tokens, int kv_heads, int d,
                       int block_size, int dtype) {
  const size_t es = dtype == 1 ? 2 : 4, row = (size_t)kv_heads * d;
  for (int64_t t = 0; t < tokens; t++) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;
    memcpy((char *)value_cache + slot * row * es, (const char *)value + t * v_stride * es, row * es);
    const int64_t block = slot / block_size, off = slot % block_size;
    for (int h = 0; h < kv_heads; h++) {
      const int64_t src = t * k_stride + (int64_t)h * d, dst = ((block * kv_heads + h) * d) * block_size + off;
      if (dtype == 1)
        for (int x = 0; x < d; x++) ((uint16_t *)key_cache)[dst + x * block_size] = ((const uint16_t *)key)[src + x];
      else
        for (int x = 0; x < d; x++) ((float *)key_cache)[dst + x * block_size] = ((const float *)key)[src + x];
    }
  }
}
