/* Unified paged attention for the CPU: one call per layer serves a mixed batch of prefill chunks and decode
 * rows, reading K/V in place through the block table (no gather copy), like kernels/attention.py on CUDA.
 *
 * Names as in kernels/reference.py; the key cache's layout is the CPU's own (cpu.py allocates it):
 *   query [num_tokens, num_heads, head_dim] (row and head strides given), out [num_tokens, num_heads, head_dim]
 *   key_cache   [num_blocks, num_kv_heads, head_dim, block_size]: K transposed within a block, contiguous
 *   value_cache [num_blocks, block_size, num_kv_heads, head_dim] (the reference's layout), contiguous
 *   query_start_loc [num_seqs + 1], seq_lens [num_seqs], block_table [num_seqs, bt_stride]: int32
 * Query row i of sequence s sits at position seq_len - query_len + i and attends to cache positions 0..that one.
 *
 * With K transposed, a block's scores for a query row are head_dim broadcast multiply-adds of 16-position vectors
 * (no horizontal sums), four query rows at a time; V rows are summed with the softmax weights as 16-wide vectors.
 * A task is a tile of up to TILE query rows of one sequence and a range of KV heads; each K/V load serves the
 * g = num_heads / num_kv_heads query heads that share it (GQA). A decode row (a tile of one) takes all KV heads in
 * one task, so that it streams whole blocks (contiguous in both caches) and prefetches the next: decode attention
 * is bound by memory. A prefill tile takes one KV head (more tasks to share out). Softmax is exact (two passes over
 * a score buffer), in fp32.
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

typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

/* 16 consecutive values as floats */
static inline v16 load16(const void *base, int64_t offset, int dtype) {
  if (dtype == 1) {
    const u32x16 u = __builtin_convertvector(*(const u16x16 *)((const uint16_t *)base + offset), u32x16) << 16;
    v16 f;
    memcpy(&f, &u, sizeof f);
    return f;
  }
  return *(const v16 *)((const float *)base + offset);
}

static inline float load_one(const void *base, int64_t offset, int dtype) {
  return dtype == 1 ? bf16_to_f32(((const uint16_t *)base)[offset]) : ((const float *)base)[offset];
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
  int num_heads, num_kv_heads, g, block_size;
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
  int *rows;              /* [rows]: row indices */
};

static inline void prefetch(const void *p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)p + off);
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
  for (int i = 0; i < n_q; i++) {
    const int64_t row = r0 + i / per_row, head = h0 * g + i % per_row;
    load_row(a->query, row * a->q_row_stride + head * a->q_head_stride, dtype, q[i], d);
    for (int x = 0; x < d; x++) q[i][x] *= a->scale, acc[i][x] = 0.0f;
  }
  /* pass 1: scores; tile row r sees positions <= first_pos + r (a block's later ones are computed, then ignored) */
  const int64_t k_block = (int64_t)a->num_kv_heads * d * bs; /* elements per block, in either cache */
  for (int p0 = 0, b = 0; p0 < last; p0 += bs, b++) {
    const int r_lo = p0 > first_pos ? p0 - first_pos : 0;
    if (hn == a->num_kv_heads && p0 + bs < last) { /* a decode task: fetch the next block of both caches */
      prefetch((const char *)a->key_cache + bt[b + 1] * k_block * es, k_block * es);
      prefetch((const char *)a->value_cache + bt[b + 1] * k_block * es, k_block * es);
    }
    for (int kh = 0; kh < hn; kh++) {
      const int64_t k_off = ((int64_t)bt[b] * a->num_kv_heads + h0 + kh) * d * bs; /* K^T [d][bs] of this head */
      int *rows = w->rows, m = 0; /* the query rows that read this head and see this block */
      for (int r = r_lo; r < nr; r++)
        for (int h = 0; h < g; h++) rows[m++] = (r * hn + kh) * g + h;
      for (int i0 = 0; i0 < m; i0 += 4) {
        const int n4 = m - i0 < 4 ? m - i0 : 4;
        const float *q0 = q[rows[i0]], *q1 = q[rows[i0 + (n4 > 1)]], *q2 = q[rows[i0 + (n4 > 2) * 2]],
                    *q3 = q[rows[i0 + (n4 > 3) * 3]];
        if (bs % 16 == 0) {
          for (int c = 0; c < bs; c += 16) {
            v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            for (int x = 0; x < d; x++) {
              const v16 k = load16(a->key_cache, k_off + (int64_t)x * bs + c, dtype);
              s0 += q0[x] * k, s1 += q1[x] * k, s2 += q2[x] * k, s3 += q3[x] * k;
            }
            const v16 sv[4] = {s0, s1, s2, s3};
            for (int j = 0; j < n4; j++) *(v16 *)(scores + rows[i0 + j] * stride + p0 + c) = sv[j];
          }
        } else {
          for (int j = 0; j < n4; j++)
            for (int c = 0; c < bs; c++) {
              const float *qj = q[rows[i0 + j]];
              float acc0 = 0.0f;
              for (int x = 0; x < d; x++) acc0 += qj[x] * load_one(a->key_cache, k_off + (int64_t)x * bs + c, dtype);
              scores[rows[i0 + j] * stride + p0 + c] = acc0;
            }
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
                         num_heads, num_kv_heads, g, block_size, scale, out};
  const int rows = TILE * g > num_heads ? TILE * g : num_heads;
  int failed = 0;
#pragma omp parallel
  {
    const size_t n_sc = (size_t)rows * (max_len + block_size), n_rows = (size_t)2 * rows * MAX_DIM;
    float *mem = (float *)malloc(sizeof(float) * (n_sc + n_rows + MAX_DIM * MAX_BLOCK + 2 * rows));
    struct scratch w = {0};
    if (mem) {
      w.scores = mem;
      w.q = (float(*)[MAX_DIM])(mem + n_sc);
      w.acc = w.q + rows;
      w.kt = (float *)(w.acc + rows);
      w.inv_sum = w.kt + MAX_DIM * MAX_BLOCK;
      w.rows = (int *)(w.inv_sum + rows);
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
