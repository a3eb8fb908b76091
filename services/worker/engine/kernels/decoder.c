/* A range of decoder layers in one call: the native model path (model.py,
 * LlamaModel._native_layers) without a trip through Python per op.
 *
 *   x = rms_norm(hidden, input_norm[first])
 *   per layer:
 *       qkv = x @ Wqkv^T               linear          rope q's and k's heads,
 *       write this step's K, V          into the pool   attention over the pool
 *       hidden += attn @ Wo^T;   x = rms_norm(hidden, post_attention_norm)
 *       act = silu(gate) * up   over x @ Wgate_up^T
 *       hidden += act @ Wdown^T; x = rms_norm(hidden, input_norm[next])  (not after the last)
 *
 * Every phase is the same kernel body the per-op entry points run (kernels.h), in the
 * same order, so the result is the per-op path's, bit for bit. The difference is one
 * OpenMP region for the whole range: the threads meet at a barrier between phases
 * instead of being woken and joined for each of the ~10 ops of every layer.
 */

#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

/* One layer's tensors; matrices (N, K) row-major, or packed (N / 16, K, 16) when their
 * bit of `packed` is set (bit 0 qkv, 1 o, 2 gate_up, 3 down). Biases may be NULL. */
typedef struct {
    const float *input_norm, *post_attention_norm;
    const float *qkv, *o, *gate_up, *down;
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias;
    float *cache_k, *cache_v; /* (num_kv_heads, pool_slots, head_dim) */
    int64_t packed;
} llmesh_layer;

static int linear_(const float *x, int64_t rows, int k, const float *w, int packed, int n,
                   const float *bias, float *out) {
    return llmesh__linear_for(x, k, rows, k, packed ? NULL : w, packed ? w : NULL, n, bias,
                              out, n);
}

/* hidden: (rows, hidden_size) contiguous, updated in place. cos_, sin_: (rows, head_dim
 * / 2). slots: each row's pool slot for this step's K/V; block_tables, row_seq,
 * positions as for llmesh_paged_attention. Returns 0, -1 when a shape is unsupported,
 * -2 when out of memory (then nothing was written). */
int llmesh_decoder_layers(float *hidden, int64_t rows, const llmesh_layer *layers,
                          int num_layers, int hidden_size, int intermediate_size, int num_heads,
                          int num_kv_heads, int head_dim, float eps, float scale,
                          const float *cos_, const float *sin_, const int64_t *slots,
                          int64_t pool_slots, int block_size, const int32_t *block_tables,
                          int64_t table_stride, const int32_t *row_seq,
                          const int32_t *positions, int num_threads) {
    if (num_kv_heads <= 0 || head_dim % 8 || hidden_size % 8 || intermediate_size % 8) return -1;
    const int group = num_heads / num_kv_heads;
    if (group > 16 || group * num_kv_heads != num_heads) return -1;
    if (rows <= 0 || num_layers <= 0) return 0;
    const int H = hidden_size, I = intermediate_size, q_size = num_heads * head_dim;
    const int kv_size = num_kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;

    int *tile_start = malloc(sizeof(int) * (rows + 1));
    float *buffer = malloc(sizeof(float) * rows * (2 * H + qkv_size + q_size + 3 * I));
    if (!tile_start || !buffer) {
        free(tile_start);
        free(buffer);
        return -2;
    }
    const int num_tiles = llmesh__attention_tiles(row_seq, (int)rows, tile_start);
    float *x = buffer, *delta = x + rows * H, *qkv = delta + rows * H;
    float *attn = qkv + rows * qkv_size, *gate_up = attn + rows * q_size, *act = gate_up + rows * 2 * I;
    int failed = 0;

#pragma omp parallel num_threads(num_threads)
    {
        /* Every thread's scratch first: once all have it no phase can fail, so the team
         * runs every phase or none (a failure midway would write this step's K/V into
         * the pools from garbage). All threads read `failed` after the same barrier. */
        if (llmesh__linear_reserve(rows) || llmesh__attention_reserve(group, head_dim)) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        int seen;
#pragma omp atomic read
        seen = failed;
        const int go = !seen;
        int status = 0;
        if (go) llmesh__rms_norm_for(hidden, H, layers[0].input_norm, eps, rows, H, x, H);
        for (int l = 0; go && l < num_layers; l++) {
            const llmesh_layer *w = &layers[l];
            status |= linear_(x, rows, H, w->qkv, w->packed & 1, qkv_size, w->qkv_bias, qkv);
            llmesh__rope_for(qkv, qkv_size, num_heads + num_kv_heads, head_dim, cos_, sin_, rows);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++)
                llmesh__write_kv_rows(qkv + q_size, qkv + q_size + kv_size, qkv_size, slots, r,
                                      r + 1, w->cache_k, w->cache_v, pool_slots, num_kv_heads,
                                      head_dim);
            status |= llmesh__attention_for(qkv, qkv_size, w->cache_k, w->cache_v, pool_slots,
                                            block_size, block_tables, table_stride, row_seq,
                                            positions, tile_start, num_tiles, attn, q_size,
                                            num_heads, num_kv_heads, head_dim, scale);
            status |= linear_(attn, rows, q_size, w->o, w->packed & 2, H, w->o_bias, delta);
            llmesh__add_rms_norm_for(hidden, H, delta, H, w->post_attention_norm, eps, rows, H, x, H);
            status |= linear_(x, rows, H, w->gate_up, w->packed & 4, 2 * I, w->gate_up_bias, gate_up);
            llmesh__silu_mul_for(gate_up, 2 * I, rows, I, act, I);
            status |= linear_(act, rows, I, w->down, w->packed & 8, H, w->down_bias, delta);
            const float *next_norm = l + 1 < num_layers ? layers[l + 1].input_norm : NULL;
            llmesh__add_rms_norm_for(hidden, H, delta, H, next_norm, eps, rows, H, x, H);
        }
        if (status) {
#pragma omp atomic write
            failed = 1;
        }
    }
    free(tile_start);
    free(buffer);
    return failed ? -2 : 0;
}
