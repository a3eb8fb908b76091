/* The kernels' work-sharing bodies, shared between their own entry points and the fused
 * decoder (decoder.c). Each is an orphaned OpenMP loop (`omp for`): called inside an
 * enclosing `omp parallel` region it splits its work across the region's threads and
 * ends with the loop's barrier; called outside one it runs on the calling thread alone.
 * Every thread of a region must call them in the same order (they are worksharing
 * constructs). Strides are in floats; a row's data is contiguous. */

#ifndef LLMESH_KERNELS_H
#define LLMESH_KERNELS_H

#include <stdint.h>

/* linear.c. y = x @ W^T (+ bias); w (n, k) row-major or packed (ceil(n / 16), k, 16),
 * exactly one given. Returns 0, or -2 when this thread had no memory for its scratch
 * (its share of the output is then left unwritten). */
int llmesh__linear_for(const float *x, int64_t x_stride, int64_t rows, int k, const float *w,
                       const float *packed, int n, const float *bias, float *out,
                       int64_t out_stride);

/* This thread's linear scratch for `rows` rows, allocated now (it is kept across calls):
 * 0, or -2 when out of memory. After it, llmesh__linear_for on this thread cannot fail. */
int llmesh__linear_reserve(int64_t rows);

/* layer_ops.c, row by row. */
void llmesh__rms_norm_for(const float *x, int64_t x_stride, const float *weight, float eps,
                          int64_t rows, int width, float *out, int64_t out_stride);
/* hidden += delta; then out = rms_norm(hidden) (weight given) or nothing (weight NULL). */
void llmesh__add_rms_norm_for(float *hidden, int64_t hidden_stride, const float *delta,
                              int64_t delta_stride, const float *weight, float eps, int64_t rows,
                              int width, float *out, int64_t out_stride);
void llmesh__rope_for(float *x, int64_t x_stride, int heads, int head_dim, const float *cos_,
                      const float *sin_, int64_t rows);
void llmesh__silu_mul_for(const float *gate_up, int64_t gate_up_stride, int64_t rows, int width,
                          float *out, int64_t out_stride);
/* Serial: rows [row_begin, row_end) of k, v into their pool slots. */
void llmesh__write_kv_rows(const float *k, const float *v, int64_t row_stride,
                           const int64_t *slots, int64_t row_begin, int64_t row_end,
                           float *cache_k, float *cache_v, int64_t pool_slots, int kv_heads,
                           int head_dim);

/* paged_attention.c. Tiles: up to 8 adjacent rows of one sequence; tile_start needs
 * num_rows + 1 entries. Returns the number of tiles. */
int llmesh__attention_tiles(const int32_t *row_seq, int num_rows, int *tile_start);
/* This thread's attention scratch, allocated now, as llmesh__linear_reserve. */
int llmesh__attention_reserve(int group, int head_dim);
/* Returns 0, or -2 when this thread had no memory for its scratch. */
int llmesh__attention_for(const float *q, int64_t q_row_stride, const float *k_cache,
                          const float *v_cache, int64_t pool_slots, int block_size,
                          const int32_t *block_tables, int64_t table_stride,
                          const int32_t *row_seq, const int32_t *positions,
                          const int *tile_start, int num_tiles, float *out,
                          int64_t out_row_stride, int num_heads, int num_kv_heads, int head_dim,
                          float scale);

#endif
