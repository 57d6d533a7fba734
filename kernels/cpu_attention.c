/* Unified paged attention for the CPU: one call per layer serves a mixed batch of prefill chunks and decode
 * rows, reading K/V in place through the block table (no gather copy), like kernels/attention.py on CUDA.
 *
 * Layout and names as in kernels/reference.py:
 *   query [num_tokens, num_heads, head_dim] (row and head strides given), out [num_tokens, num_heads, head_dim]
 *   key_cache, value_cache [num_blocks, block_size, num_kv_heads, head_dim], contiguous
 *   query_start_loc [num_seqs + 1], seq_lens [num_seqs], block_table [num_seqs, bt_stride]: int32
 * Query row i of sequence s sits at position seq_len - query_len + i and attends to cache positions 0..that one.
 *
 * A task is a tile of up to TILE query rows of one sequence and a range of KV heads; each K/V row load serves the
 * g = num_heads / num_kv_heads query heads that share it (GQA). A decode row (a tile of one) takes all KV heads in
 * one task, so that it streams whole cache slots (all heads of a position are adjacent) and prefetches the next
 * block: decode attention is bound by memory, not arithmetic. A prefill tile takes one KV head (more tasks to
 * share out). Softmax is exact (two passes over a score buffer), in fp32.
 * dtype: 0 = float32, 1 = bfloat16 (query, caches and out alike). Built by kernels/cpu.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

#define TILE 8
#define MAX_DIM 256
#define MAX_BLOCK 128 /* V rows converted at once */

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


struct args {
  const void *query, *key_cache, *value_cache;
  int64_t q_row_stride, q_head_stride, bt_stride, kv_row;
  const int32_t *query_start_loc, *seq_lens, *block_table, *tile_seq, *tile_row0;
  int num_heads, g, block_size;
  float scale;
  void *out;
};

/* per-thread buffers: rows = the most query rows (row x head) one task has */
struct scratch {
  float *scores;          /* [rows][stride]: a row's scores, then its softmax weights */
  float (*q)[MAX_DIM];    /* [rows][MAX_DIM]: scaled queries */
  float (*acc)[MAX_DIM];  /* [rows][MAX_DIM] */
  float *kt;              /* [MAX_BLOCK][MAX_DIM]: V rows of a block, converted */
  float *inv_sum;         /* [rows] */
};

/* Prefetch the cache lines of KV heads h0..h0+hn-1 of a block's first n slots. */
static inline void prefetch_block(const void *cache, int64_t base, int n, int64_t kv_row, int h0, int hn, int d,
                                  int es) {
  for (int j = 0; j < n; j++) {
    const char *p = (const char *)cache + ((base + j) * kv_row + (int64_t)h0 * d) * es;
    for (int off = 0; off < hn * d * es; off += 64) __builtin_prefetch(p + off);
  }
}

/* Query row i of the task is tile row i / (hn * g), query head h0 * g + i % (hn * g): so rows kh*g..kh*g+g-1 of
 * a tile row read KV head h0 + kh. Inlined with constant d and dtype, so that the row loops unroll. */
static inline __attribute__((always_inline)) void run_task(const struct args *a, int tile, int h0, int hn,
                                                           struct scratch *w, const int d, const int dtype) {
  const int g = a->g, bs = a->block_size, es = dtype == 1 ? 2 : 4, per_row = hn * g;
  const int s = a->tile_seq[tile], r0 = a->tile_row0[tile];
  const int q_start = a->query_start_loc[s], q_end = a->query_start_loc[s + 1];
  const int nr = q_end - r0 < TILE ? q_end - r0 : TILE;
  const int first_pos = a->seq_lens[s] - (q_end - q_start) + (r0 - q_start); /* position of row r0 */
  const int32_t *bt = a->block_table + (int64_t)s * a->bt_stride;
  const int n_q = nr * per_row, last = first_pos + nr; /* the tile reads cache positions 0..last-1 */
  const int64_t stride = (int64_t)(last + bs - 1) / bs * bs; /* a score row: whole blocks */
  float *scores = w->scores, *kt = w->kt;
  float(*q)[MAX_DIM] = w->q, (*acc)[MAX_DIM] = w->acc;
  float row[MAX_DIM];
  for (int i = 0; i < n_q; i++) {
    load_row(a->query, (int64_t)(r0 + i / per_row) * a->q_row_stride + (int64_t)(h0 * g + i % per_row) * a->q_head_stride,
             dtype, q[i], d);
    for (int x = 0; x < d; x++) q[i][x] *= a->scale, acc[i][x] = 0.0f;
  }
  /* pass 1: scores; tile row r sees positions <= first_pos + r */
  for (int p0 = 0, b = 0; p0 < last; p0 += bs, b++) {
    const int64_t base = (int64_t)bt[b] * bs;
    const int n = last - p0 < bs ? last - p0 : bs;
    if (nr == 1 && p0 + bs < last) { /* decode: memory-bound */
      const int n_next = last - p0 - bs < bs ? last - p0 - bs : bs;
      prefetch_block(a->key_cache, (int64_t)bt[b + 1] * bs, n_next, a->kv_row, h0, hn, d, es);
    }
    for (int j = 0; j < n; j++) { /* one dot per (row, head): slots are read whole, head after head */
      const int p = p0 + j, r_min = p > first_pos ? p - first_pos : 0;
      for (int kh = 0; kh < hn; kh++) {
        load_row(a->key_cache, (base + j) * a->kv_row + (int64_t)(h0 + kh) * d, dtype, row, d);
        for (int r = r_min; r < nr; r++)
          for (int h = 0; h < g; h++) {
            const int i = (r * hn + kh) * g + h;
            scores[i * stride + p] = dot(q[i], row, d);
          }
      }
    }
  }
  /* softmax of each (row, head) over its causal length */
  for (int i = 0; i < n_q; i++) {
    const int len = first_pos + i / per_row + 1;
    float *sc = scores + i * stride, m = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : m)
    for (int p = 0; p < len; p++) m = sc[p] > m ? sc[p] : m;
#pragma omp simd reduction(+ : sum)
    for (int p = 0; p < len; p++) {
      sc[p] = exp_nonpos(sc[p] - m);
      sum += sc[p];
    }
    w->inv_sum[i] = 1.0f / sum;
  }
  /* pass 2: weighted sum of V rows, a block at a time: a head's V rows of the block are converted once (into kt),
   * then each query row's accumulator stays in registers across them */
  for (int p0 = 0, b = 0; p0 < last; p0 += bs, b++) {
    const int64_t base = (int64_t)bt[b] * bs;
    const int n = last - p0 < bs ? last - p0 : bs, r_lo = p0 > first_pos ? p0 - first_pos : 0;
    if (nr == 1 && p0 + bs < last) { /* decode: memory-bound */
      const int n_next = last - p0 - bs < bs ? last - p0 - bs : bs;
      prefetch_block(a->value_cache, (int64_t)bt[b + 1] * bs, n_next, a->kv_row, h0, hn, d, es);
    }
    for (int j0 = 0; j0 < n; j0 += MAX_BLOCK)
      for (int kh = 0; kh < hn; kh++) {
        const int nj = n - j0 < MAX_BLOCK ? n - j0 : MAX_BLOCK;
        for (int j = 0; j < nj; j++)
          load_row(a->value_cache, (base + j0 + j) * a->kv_row + (int64_t)(h0 + kh) * d, dtype, kt + j * d, d);
        for (int r = r_lo; r < nr; r++) {
          const int len = first_pos + r + 1 - p0 - j0, m = len < nj ? len : nj; /* causal */
          for (int h = 0; h < g; h++) {
            const int i = (r * hn + kh) * g + h;
            const float *wt = scores + i * stride + p0 + j0;
            if (d % 16 == 0) {
              v16 av[MAX_DIM / 16];
              for (int c = 0; c < d / 16; c++) av[c] = *(const v16 *)(acc[i] + 16 * c);
              for (int j = 0; j < m; j++)
                for (int c = 0; c < d / 16; c++) av[c] += wt[j] * *(const v16 *)(kt + j * d + 16 * c);
              for (int c = 0; c < d / 16; c++) *(v16 *)(acc[i] + 16 * c) = av[c];
            } else {
              for (int j = 0; j < m; j++)
                for (int x = 0; x < d; x++) acc[i][x] += wt[j] * kt[j * d + x];
            }
          }
        }
      }
  }
  for (int i = 0; i < n_q; i++) {
    const int64_t o = ((int64_t)(r0 + i / per_row) * a->num_heads + h0 * g + i % per_row) * d;
    if (dtype == 1) {
      uint16_t *dst = (uint16_t *)a->out + o;
      for (int x = 0; x < d; x++) dst[x] = f32_to_bf16(acc[i][x] * w->inv_sum[i]);
    } else {
      float *dst = (float *)a->out + o;
      for (int x = 0; x < d; x++) dst[x] = acc[i][x] * w->inv_sum[i];
    }
  }
}

/* run_task with the common head dims and dtypes as constants */
static inline __attribute__((always_inline)) void dispatch(const struct args *a, int t, int h0, int hn,
                                                           struct scratch *w, int d, int dtype) {
  if (d == 64 && dtype == 1) run_task(a, t, h0, hn, w, 64, 1);
  else if (d == 128 && dtype == 1) run_task(a, t, h0, hn, w, 128, 1);
  else if (d == 64 && dtype == 0) run_task(a, t, h0, hn, w, 64, 0);
  else if (d == 128 && dtype == 0) run_task(a, t, h0, hn, w, 128, 0);
  else run_task(a, t, h0, hn, w, d, dtype);
}

int paged_attention(const void *query, int64_t q_row_stride, int64_t q_head_stride, const void *key_cache,
                    const void *value_cache, const int32_t *query_start_loc, const int32_t *seq_lens,
                    const int32_t *block_table, int64_t bt_stride, int num_seqs, int num_heads, int num_kv_heads,
                    int head_dim, int block_size, float scale, int dtype, void *out) {
  if (head_dim > MAX_DIM || num_heads % num_kv_heads) return -1;
  const int g = num_heads / num_kv_heads, d = head_dim;
  int max_len = 1, num_tiles = 0, num_tasks = 0;
  for (int s = 0; s < num_seqs; s++) {
    const int ql = query_start_loc[s + 1] - query_start_loc[s];
    num_tiles += (ql + TILE - 1) / TILE;
    num_tasks += ql == 1 ? 1 : (ql + TILE - 1) / TILE * num_kv_heads;
    if (seq_lens[s] > max_len) max_len = seq_lens[s];
  }
  /* tiles (sequence, first row), then tasks (tile, first KV head, KV heads) */
  int *buf = (int *)malloc(sizeof(int) * (2 * (size_t)num_tiles + 3 * (size_t)num_tasks + 1));
  if (!buf) return -2;
  int *tile_seq = buf, *tile_row0 = buf + num_tiles, *task = buf + 2 * num_tiles;
  for (int s = 0, t = 0, k = 0; s < num_seqs; s++)
    for (int r = query_start_loc[s]; r < query_start_loc[s + 1]; r += TILE, t++) {
      tile_seq[t] = s, tile_row0[t] = r;
      if (query_start_loc[s + 1] - query_start_loc[s] == 1)
        task[3 * k] = t, task[3 * k + 1] = 0, task[3 * k + 2] = num_kv_heads, k++;
      else
        for (int h = 0; h < num_kv_heads; h++) task[3 * k] = t, task[3 * k + 1] = h, task[3 * k + 2] = 1, k++;
    }
  const struct args a = {query, key_cache, value_cache, q_row_stride, q_head_stride, bt_stride,
                         (int64_t)num_kv_heads * d, query_start_loc, seq_lens, block_table, tile_seq, tile_row0,
                         num_heads, g, block_size, scale, out};
  const int rows = TILE * g > num_heads ? TILE * g : num_heads;
  int failed = 0;
#pragma omp parallel
  {
    const size_t n_sc = (size_t)rows * (max_len + block_size), n_rows = (size_t)2 * rows * MAX_DIM;
    float *mem = (float *)malloc(sizeof(float) * (n_sc + n_rows + MAX_DIM * MAX_BLOCK + rows));
    struct scratch w = {0};
    if (mem) {
      w.scores = mem;
      w.q = (float(*)[MAX_DIM])(mem + n_sc);
      w.acc = w.q + rows;
      w.kt = (float *)(w.acc + rows);
      w.inv_sum = w.kt + MAX_DIM * MAX_BLOCK;
    } else {
      failed = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int k = 0; k < num_tasks; k++) {
      if (!mem) continue;
      const int t = task[3 * k], h0 = task[3 * k + 1], hn = task[3 * k + 2];
      if (hn == 1) dispatch(&a, t, h0, 1, &w, d, dtype); /* prefill tiles: one KV head, a constant */
      else dispatch(&a, t, h0, hn, &w, d, dtype);
    }
    free(mem);
  }
  free(buf);
  return failed ? -2 : 0;
}
