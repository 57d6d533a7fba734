/* Unified paged attention for the CPU: one call per layer serves a mixed batch of prefill chunks and decode
 * rows, reading K/V in place through the block table (no gather copy), like kernels/attention.py on CUDA.
 *
 * Layout and names as in kernels/reference.py:
 *   query [num_tokens, num_heads, head_dim] (row and head strides given), out [num_tokens, num_heads, head_dim]
 *   key_cache, value_cache [num_blocks, block_size, num_kv_heads, head_dim], contiguous
 *   query_start_loc [num_seqs + 1], seq_lens [num_seqs], block_table [num_seqs, bt_stride]: int32
 * Query row i of sequence s sits at position seq_len - query_len + i and attends to cache positions 0..that one.
 *
 * One task is (sequence, KV head, tile of up to TILE query rows): the tile's g = num_heads / num_kv_heads query
 * heads share each K/V row load (GQA). Softmax is exact (two passes over a score buffer), in fp32.
 * dtype: 0 = float32, 1 = bfloat16 (query, caches and out alike). Built by kernels/cpu.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 8
#define MAX_DIM 256
#define MAX_GROUP 16

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

/* 16 floats; aligned(4) so that any float pointer may be loaded as one */
typedef float v16 __attribute__((vector_size(64), aligned(4)));

static inline float hsum16(v16 v) {
  v16 t = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  t = t + __builtin_shufflevector(t, t, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  t = t + __builtin_shufflevector(t, t, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return t[0] + t[1];
}

static inline float dot(const float *a, const float *b, int d) {
  if (d % 16 == 0) { /* vector accumulators, one tree sum at the end */
    v16 acc = {0};
    for (int x = 0; x < d; x += 16) acc += *(const v16 *)(a + x) * *(const v16 *)(b + x);
    return hsum16(acc);
  }
  float acc = 0.0f;
  for (int x = 0; x < d; x++) acc += a[x] * b[x];
  return acc;
}

static inline void load_row(const void *base, int64_t offset, int dtype, float *dst, int d) {
  if (dtype == 1) {
    const uint16_t *src = (const uint16_t *)base + offset;
#pragma omp simd
    for (int x = 0; x < d; x++) dst[x] = bf16_to_f32(src[x]);
  } else {
    memcpy(dst, (const float *)base + offset, (size_t)d * sizeof(float));
  }
}

/* exp(x) for x <= 0 in plain arithmetic, so that loops over it vectorise: 2^y = 2^n * 2^f, f in [-0.5, 0.5],
 * 2^f by its Taylor series to degree 7 (relative error < 1e-8, below float rounding). */
static inline float exp_nonpos(float x) {
  float y = x * 1.4426950408889634f;
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
  return p * s;
}

struct args {
  const void *query, *key_cache, *value_cache;
  int64_t q_row_stride, q_head_stride, bt_stride, kv_row;
  const int32_t *query_start_loc, *seq_lens, *block_table, *tile_seq, *tile_row0;
  int num_heads, num_kv_heads, g, block_size;
  float scale;
  void *out;
};

/* One task: query tile `tile` of a sequence against KV head `kvh`. Inlined with constant d and dtype, so that
 * the row loops unroll into a few vector instructions. */
static inline __attribute__((always_inline)) void run_task(const struct args *a, int tile, int kvh, float *scores,
                                                           float (*q)[MAX_DIM], float (*acc)[MAX_DIM],
                                                           const int d, const int dtype) {
  const int g = a->g, bs = a->block_size;
  const int s = a->tile_seq[tile], r0 = a->tile_row0[tile];
  const int q_start = a->query_start_loc[s], q_end = a->query_start_loc[s + 1];
  const int nr = q_end - r0 < TILE ? q_end - r0 : TILE;
  const int first_pos = a->seq_lens[s] - (q_end - q_start) + (r0 - q_start); /* position of row r0 */
  const int32_t *bt = a->block_table + (int64_t)s * a->bt_stride;
  const int n_q = nr * g, last = first_pos + nr; /* the tile reads cache positions 0..last-1 */
  float row[MAX_DIM], inv_sum[TILE * MAX_GROUP];
  for (int i = 0; i < n_q; i++) {
    load_row(a->query, (int64_t)(r0 + i / g) * a->q_row_stride + (int64_t)(kvh * g + i % g) * a->q_head_stride,
             dtype, q[i], d);
    for (int x = 0; x < d; x++) q[i][x] *= a->scale, acc[i][x] = 0.0f;
  }
  /* pass 1: scores; query row r sees positions <= first_pos + r */
  for (int p0 = 0, b = 0; p0 < last; p0 += bs, b++) {
    const int64_t base = (int64_t)bt[b] * bs;
    const int n = last - p0 < bs ? last - p0 : bs;
    for (int j = 0; j < n; j++) {
      const int p = p0 + j, r_min = p > first_pos ? p - first_pos : 0;
      load_row(a->key_cache, (base + j) * a->kv_row + (int64_t)kvh * d, dtype, row, d);
      for (int i = r_min * g; i < n_q; i++) {
        scores[(int64_t)i * last + p] = dot(q[i], row, d);
      }
    }
  }
  /* softmax of each (row, head) over its causal length */
  for (int i = 0; i < n_q; i++) {
    const int len = first_pos + i / g + 1;
    float *sc = scores + (int64_t)i * last, m = -INFINITY, sum = 0.0f;
    for (int p = 0; p < len; p++) m = sc[p] > m ? sc[p] : m;
#pragma omp simd reduction(+ : sum)
    for (int p = 0; p < len; p++) {
      sc[p] = exp_nonpos(sc[p] - m);
      sum += sc[p];
    }
    inv_sum[i] = 1.0f / sum;
  }
  /* pass 2: weighted sum of V rows */
  for (int p0 = 0, b = 0; p0 < last; p0 += bs, b++) {
    const int64_t base = (int64_t)bt[b] * bs;
    const int n = last - p0 < bs ? last - p0 : bs;
    for (int j = 0; j < n; j++) {
      const int p = p0 + j, r_min = p > first_pos ? p - first_pos : 0;
      load_row(a->value_cache, (base + j) * a->kv_row + (int64_t)kvh * d, dtype, row, d);
      for (int i = r_min * g; i < n_q; i++) {
        const float w = scores[(int64_t)i * last + p];
        for (int x = 0; x < d; x++) acc[i][x] += w * row[x];
      }
    }
  }
  for (int i = 0; i < n_q; i++) {
    const int64_t o = ((int64_t)(r0 + i / g) * a->num_heads + kvh * g + i % g) * d;
    if (dtype == 1) {
      uint16_t *dst = (uint16_t *)a->out + o;
      for (int x = 0; x < d; x++) dst[x] = f32_to_bf16(acc[i][x] * inv_sum[i]);
    } else {
      float *dst = (float *)a->out + o;
      for (int x = 0; x < d; x++) dst[x] = acc[i][x] * inv_sum[i];
    }
  }
}

int paged_attention(const void *query, int64_t q_row_stride, int64_t q_head_stride, const void *key_cache,
                    const void *value_cache, const int32_t *query_start_loc, const int32_t *seq_lens,
                    const int32_t *block_table, int64_t bt_stride, int num_seqs, int num_heads, int num_kv_heads,
                    int head_dim, int block_size, float scale, int dtype, void *out) {
  if (head_dim > MAX_DIM || num_heads % num_kv_heads || num_heads / num_kv_heads > MAX_GROUP) return -1;
  const int g = num_heads / num_kv_heads, d = head_dim;
  int max_len = 1, num_tiles = 0;
  for (int s = 0; s < num_seqs; s++) {
    num_tiles += (query_start_loc[s + 1] - query_start_loc[s] + TILE - 1) / TILE;
    if (seq_lens[s] > max_len) max_len = seq_lens[s];
  }
  int *tile_seq = (int *)malloc(sizeof(int) * (num_tiles + 1)), *tile_row0 = (int *)malloc(sizeof(int) * (num_tiles + 1));
  if (!tile_seq || !tile_row0) {
    free(tile_seq);
    free(tile_row0);
    return -2;
  }
  for (int s = 0, t = 0; s < num_seqs; s++)
    for (int r = query_start_loc[s]; r < query_start_loc[s + 1]; r += TILE) tile_seq[t] = s, tile_row0[t++] = r;
  const struct args a = {query, key_cache, value_cache, q_row_stride, q_head_stride, bt_stride,
                         (int64_t)num_kv_heads * d, query_start_loc, seq_lens, block_table, tile_seq, tile_row0,
                         num_heads, num_kv_heads, g, block_size, scale, out};
  const int64_t total = (int64_t)num_tiles * num_kv_heads;
  int failed = 0;
#pragma omp parallel
  {
    /* per thread: scores [TILE * g][max_len], then q and acc [TILE * g][MAX_DIM] */
    const size_t n_sc = (size_t)TILE * g * max_len, n_qa = (size_t)TILE * g * MAX_DIM;
    float *scores = (float *)malloc(sizeof(float) * (n_sc + 2 * n_qa));
    float(*q)[MAX_DIM] = (float(*)[MAX_DIM])(scores + n_sc), (*acc)[MAX_DIM] = q + TILE * g;
    if (!scores) failed = 1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < total; task++) {
      if (!scores) continue;
      const int tile = (int)(task / num_kv_heads), kvh = (int)(task % num_kv_heads);
      if (d == 64 && dtype == 1) run_task(&a, tile, kvh, scores, q, acc, 64, 1);
      else if (d == 128 && dtype == 1) run_task(&a, tile, kvh, scores, q, acc, 128, 1);
      else if (d == 64 && dtype == 0) run_task(&a, tile, kvh, scores, q, acc, 64, 0);
      else if (d == 128 && dtype == 0) run_task(&a, tile, kvh, scores, q, acc, 128, 0);
      else run_task(&a, tile, kvh, scores, q, acc, d, dtype);
    }
    free(scores);
  }
  free(tile_seq);
  free(tile_row0);
  return failed ? -2 : 0;
}
