/* The decoder layer's elementwise and row-wise work for float32 on CPU, one call each
 * instead of a handful of torch ops (the tiny model's steps are dominated by per-op
 * overhead once the matmuls are done):
 *
 *   llmesh_rms_norm       out = w * (x * 1/sqrt(mean(x^2) + eps))         per row
 *   llmesh_add_rms_norm   hidden += delta; out = rms_norm(hidden)          per row
 *   llmesh_rope           rotate the first `heads` heads of each row in place
 *   llmesh_silu_mul       out = gate / (1 + exp(-gate)) * up
 *   llmesh_write_kv       copy each row's K and V into its pool slot
 *
 * Each row's result depends on that row alone, by a fixed sequence of IEEE operations
 * (threads split rows, never a row), so the ops are batch-invariant. Row strides are
 * in floats; within a row the data is contiguous. Widths must be multiples of 8.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "vec.h"

/* Floats per call below which threads cost more than they save. */
#define PARALLEL_FLOATS (1 << 16)

static inline void rms_row(const float *x, const float *weight, float eps, int width,
                           float *out) {
    v8sf squares = splat(0.0f);
    for (int i = 0; i < width; i += 8) {
        v8sf v = load8(x + i);
        squares += v * v;
    }
    v8sf inv = splat(1.0f / sqrtf(lane_sum(squares) / (float)width + eps));
    for (int i = 0; i < width; i += 8) store8(out + i, load8(weight + i) * (load8(x + i) * inv));
}

void llmesh__rms_norm_for(const float *x, int64_t x_stride, const float *weight, float eps,
                          int64_t rows, int width, float *out, int64_t out_stride) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) rms_row(x + r * x_stride, weight, eps, width, out + r * out_stride);
}

void llmesh__add_rms_norm_for(float *hidden, int64_t hidden_stride, const float *delta,
                              int64_t delta_stride, const float *weight, float eps, int64_t rows,
                              int width, float *out, int64_t out_stride) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *h = hidden + r * hidden_stride;
        const float *d = delta + r * delta_stride;
        for (int i = 0; i < width; i += 8) store8(h + i, load8(h + i) + load8(d + i));
        if (weight) rms_row(h, weight, eps, width, out + r * out_stride);
    }
}

/* HF's rotate_half convention: x1, x2 = halves; x1 * cos - x2 * sin, x2 * cos + x1 * sin.
 * cos, sin: (rows, head_dim / 2) contiguous. */
static void rope_row(float *x, int heads, int head_dim, const float *c, const float *s) {
    const int half = head_dim / 2;
    for (int h = 0; h < heads; h++) {
        float *x1 = x + (int64_t)h * head_dim, *x2 = x1 + half;
        for (int i = 0; i < half; i++) {
            float a = x1[i], b = x2[i];
            x1[i] = a * c[i] - b * s[i];
            x2[i] = b * c[i] + a * s[i];
        }
    }
}

void llmesh__rope_for(float *x, int64_t x_stride, int heads, int head_dim, const float *cos_,
                      const float *sin_, int64_t rows) {
    const int half = head_dim / 2;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        rope_row(x + r * x_stride, heads, head_dim, cos_ + r * half, sin_ + r * half);
}

/* gate_up: rows of [gate (width) | up (width)]; out: (rows, width). */
void llmesh__silu_mul_for(const float *gate_up, int64_t gate_up_stride, int64_t rows, int width,
                          float *out, int64_t out_stride) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * gate_up_stride, *u = g + width;
        float *o = out + r * out_stride;
        for (int i = 0; i < width; i += 8) {
            v8sf gate = load8(g + i);
            v8sf silu = gate / (splat(1.0f) + exp_v8(splat(0.0f) - gate));
            store8(o + i, silu * load8(u + i));
        }
    }
}

/* k, v: (rows, kv_heads, head_dim) with row strides; cache_k, cache_v: (kv_heads,
 * pool_slots, head_dim); slots: (rows,) pool slot of each row. */
void llmesh__write_kv_rows(const float *k, const float *v, int64_t row_stride,
                           const int64_t *slots, int64_t row_begin, int64_t row_end,
                           float *cache_k, float *cache_v, int64_t pool_slots, int kv_heads,
                           int head_dim) {
    const size_t bytes = sizeof(float) * head_dim;
    for (int64_t r = row_begin; r < row_end; r++)
        for (int h = 0; h < kv_heads; h++) {
            int64_t at = ((int64_t)h * pool_slots + slots[r]) * head_dim;
            memcpy(cache_k + at, k + r * row_stride + (int64_t)h * head_dim, bytes);
            memcpy(cache_v + at, v + r * row_stride + (int64_t)h * head_dim, bytes);
        }
}

/* ---- entry points (ctypes) --------------------------------------------------------- */

void llmesh_rms_norm(const float *x, int64_t x_stride, const float *weight, float eps,
                     int64_t rows, int width, float *out, int64_t out_stride, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (rows * width >= PARALLEL_FLOATS)
    llmesh__rms_norm_for(x, x_stride, weight, eps, rows, width, out, out_stride);
}

void llmesh_add_rms_norm(float *hidden, int64_t hidden_stride, const float *delta,
                         int64_t delta_stride, const float *weight, float eps, int64_t rows,
                         int width, float *out, int64_t out_stride, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (rows * width >= PARALLEL_FLOATS)
    llmesh__add_rms_norm_for(hidden, hidden_stride, delta, delta_stride, weight, eps, rows,
                             width, out, out_stride);
}

void llmesh_rope(float *x, int64_t x_stride, int heads, int head_dim, const float *cos_,
                 const float *sin_, int64_t rows, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (rows * heads * head_dim >= PARALLEL_FLOATS)
    llmesh__rope_for(x, x_stride, heads, head_dim, cos_, sin_, rows);
}

void llmesh_silu_mul(const float *gate_up, int64_t gate_up_stride, int64_t rows, int width,
                     float *out, int64_t out_stride, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (rows * width >= PARALLEL_FLOATS / 4)
    llmesh__silu_mul_for(gate_up, gate_up_stride, rows, width, out, out_stride);
}

void llmesh_write_kv(const float *k, const float *v, int64_t row_stride, const int64_t *slots,
                     int64_t rows, float *cache_k, float *cache_v, int64_t pool_slots,
                     int kv_heads, int head_dim) {
    llmesh__write_kv_rows(k, v, row_stride, slots, 0, rows, cache_k, cache_v, pool_slots,
                          kv_heads, head_dim);
}
