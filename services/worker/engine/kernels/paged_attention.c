/* Paged attention for float32 KV pools: every query row attends over its own
 * sequence's keys 0..position, read in place through the block table (no gather, no
 * padding, no mask).
 *
 * Batch invariance by construction: a (row, query head)'s result is computed by one
 * thread, from its own query and keys only, by the same sequence of IEEE operations
 * whatever rows share the call, however they are tiled, and however many threads run:
 *
 *   per chunk of CHUNK keys (chunks start at key 0, so a row's chunking depends on its
 *   position alone):
 *       s_l = dot(q * scale, k_l)           fixed lane tree over head_dim
 *       m   = max_l s_l                     exact
 *       w_l = exp(s_l - m)                  exp_v8 (vec.h): plain mul/add, no libm
 *       sum = lane tree of w;  acc = sum_l w_l * v_l  (in key order)
 *   chunk partials (m, sum, acc) merge as a binary counter (two partials covering 2^k
 *   chunks each merge into one covering 2^(k+1)), the rest from the newest down;
 *   out = acc / sum.
 *
 * Compiled with -ffp-contract=off and no -ffast-math, so the compiler neither fuses
 * a*b+c nor reorders sums: the bits do not depend on the instruction set either.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "vec.h"

#define CHUNK 64      /* keys per partial */
#define TILE 8        /* query rows of one sequence that share a pass over the keys */
#define MAX_LEVELS 40 /* binary counter depth: 2^39 chunks is more than any context */

static inline float exp_1(float x) { return exp_v8(splat(x))[0]; }

typedef struct {
    float m, sum;
    int64_t count; /* chunks covered */
} partial_head;

/* One (row, query head)'s stack of chunk partials: acc vectors live in `acc`. */
typedef struct {
    int depth;
    partial_head level[MAX_LEVELS];
    float *acc; /* MAX_LEVELS * head_dim */
} partial_stack;

/* b (later keys) into a (earlier keys): a = merge(a, b). */
static void merge(partial_head *a, float *acc_a, const partial_head *b, const float *acc_b,
                  int head_dim) {
    float m = a->m > b->m ? a->m : b->m;
    float fa = exp_1(a->m - m), fb = exp_1(b->m - m);
    a->sum = a->sum * fa + b->sum * fb;
    v8sf va = splat(fa), vb = splat(fb);
    for (int d = 0; d < head_dim; d += 8)
        store8(acc_a + d, load8(acc_a + d) * va + load8(acc_b + d) * vb);
    a->m = m;
    a->count += b->count;
}

static void push(partial_stack *s, float m, float sum, const float *acc, int head_dim) {
    int top = s->depth++;
    s->level[top] = (partial_head){m, sum, 1};
    memcpy(s->acc + (int64_t)top * head_dim, acc, sizeof(float) * head_dim);
    while (s->depth >= 2 && s->level[s->depth - 1].count == s->level[s->depth - 2].count) {
        int b = s->depth - 1, a = b - 1;
        merge(&s->level[a], s->acc + (int64_t)a * head_dim, &s->level[b],
              s->acc + (int64_t)b * head_dim, head_dim);
        s->depth--;
    }
}

static void finish(partial_stack *s, float *out, int head_dim) {
    while (s->depth >= 2) {
        int b = s->depth - 1, a = b - 1;
        merge(&s->level[a], s->acc + (int64_t)a * head_dim, &s->level[b],
              s->acc + (int64_t)b * head_dim, head_dim);
        s->depth--;
    }
    v8sf inv_sum = splat(s->level[0].sum);
    for (int d = 0; d < head_dim; d += 8) store8(out + d, load8(s->acc + d) / inv_sum);
}

/* dot(q, key) over head_dim as 8 lane partials (key order of d within a lane). */
static inline v8sf dot_lanes(const float *qv, const float *key, int head_dim) {
    v8sf dot = load8(qv) * load8(key);
    for (int d = 8; d < head_dim; d += 8) dot += load8(qv + d) * load8(key + d);
    return dot;
}

/* lane_sum of eight vectors at once: lane k of the result is lane_sum(v[k]), the same
 * tree ((0+1)+(2+3))+((4+5)+(6+7)) over v[k]'s lanes. Every shuffle is one shufps (even
 * and odd lanes of two vectors, per 128-bit half) or, last, one vperm2f128. */
static inline v8sf lane_sums8(const v8sf v[8]) {
    const v8si even = {0, 2, 8, 10, 4, 6, 12, 14}, odd = {1, 3, 9, 11, 5, 7, 13, 15};
    const v8si lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    v8sf a[4], b[2];
    for (int i = 0; i < 4; i++) /* k0 (0+1), k0 (2+3), k1 (0+1), k1 (2+3) | (4+5), (6+7) */
        a[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], even) +
               __builtin_shuffle(v[2 * i], v[2 * i + 1], odd);
    for (int i = 0; i < 2; i++) /* k0..k3 ((0+1)+(2+3)) | k0..k3 ((4+5)+(6+7)) */
        b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], even) +
               __builtin_shuffle(a[2 * i], a[2 * i + 1], odd);
    return __builtin_shuffle(b[0], b[1], lo4) + __builtin_shuffle(b[0], b[1], hi4);
}

/* a[h][d] = sum over keys i < n, in key order, of w[h][i] * values[i][d], for HP heads
 * and 16 dims from d0: HP * 2 independent accumulator chains (one chain per vector
 * would wait on the add latency every key), which with the two value vectors and the
 * weight fit AVX2's 16 registers (32 dims at 4 heads would spill accumulators to the
 * stack on every key). Each lane's sum is the same sequence of adds whatever HP and
 * the slicing, so every variant gives the same bits. */
#define DEFINE_ACCUMULATE(HP)                                                              \
    static void accumulate_##HP(const float *w, const float *const *values, int n, int d0, \
                                float *a, int head_dim) {                                  \
        v8sf sum[HP][2];                                                                   \
        for (int h = 0; h < HP; h++) sum[h][0] = sum[h][1] = splat(0.0f);                  \
        for (int i = 0; i < n; i++) {                                                      \
            const float *v = values[i] + d0;                                               \
            v8sf v0 = load8(v), v1 = load8(v + 8);                                         \
            for (int h = 0; h < HP; h++) {                                                 \
                v8sf weight = splat(w[h * CHUNK + i]);                                     \
                sum[h][0] += weight * v0;                                                  \
                sum[h][1] += weight * v1;                                                  \
            }                                                                              \
        }                                                                                  \
        for (int h = 0; h < HP; h++) {                                                     \
            store8(a + (int64_t)h * head_dim + d0, sum[h][0]);                             \
            store8(a + (int64_t)h * head_dim + d0 + 8, sum[h][1]);                         \
        }                                                                                  \
    }
DEFINE_ACCUMULATE(1)
DEFINE_ACCUMULATE(2)
DEFINE_ACCUMULATE(4)

/* w: (group, CHUNK) weights; a: (group, head_dim) out. */
static void accumulate(const float *w, const float *const *values, int n, float *a, int group,
                       int head_dim) {
    if (head_dim % 16 != 0) { /* one chain per 8 dims */
        for (int h = 0; h < group; h++)
            for (int d = 0; d < head_dim; d += 8) {
                v8sf sum = splat(0.0f);
                for (int i = 0; i < n; i++) sum += splat(w[h * CHUNK + i]) * load8(values[i] + d);
                store8(a + (int64_t)h * head_dim + d, sum);
            }
        return;
    }
    for (int d0 = 0; d0 < head_dim; d0 += 16) {
        int h = 0;
        for (; h + 4 <= group; h += 4)
            accumulate_4(w + h * CHUNK, values, n, d0, a + (int64_t)h * head_dim, head_dim);
        for (; h + 2 <= group; h += 2)
            accumulate_2(w + h * CHUNK, values, n, d0, a + (int64_t)h * head_dim, head_dim);
        for (; h < group; h++)
            accumulate_1(w + h * CHUNK, values, n, d0, a + (int64_t)h * head_dim, head_dim);
    }
}

static inline void prefetch_row(const float *row, int head_dim) {
    for (int d = 0; d < head_dim; d += 16) __builtin_prefetch(row + d); /* 64-byte lines */
}

/* rows [row_begin, row_end) all belong to one sequence, positions ascending. */
static void attend_tile(const float *q, int64_t q_row_stride, const float *k_cache,
                        const float *v_cache, int64_t pool_slots, int block_size,
                        const int32_t *block_table, const int32_t *positions, int row_begin,
                        int row_end, float *out, int64_t out_row_stride, int kv_head,
                        int num_queries_per_kv, int head_dim, float scale, float *scratch) {
    const int rows = row_end - row_begin, group = num_queries_per_kv, pairs = rows * group;
    /* scratch: queries (pairs, hd) | weights (pairs, CHUNK) | chunk acc (pairs, hd) |
     * stacks' acc (pairs, MAX_LEVELS, hd) */
    float *qs = scratch;
    float *scores = qs + (int64_t)pairs * head_dim;
    float *acc = scores + (int64_t)pairs * CHUNK;
    float *stack_acc = acc + (int64_t)pairs * head_dim;
    partial_stack stacks[TILE * 16];
    const float *keys[CHUNK], *values[CHUNK];
    const float *k_head = k_cache + (int64_t)kv_head * pool_slots * head_dim;
    const float *v_head = v_cache + (int64_t)kv_head * pool_slots * head_dim;
    v8sf vscale = splat(scale);

    for (int r = 0; r < rows; r++)
        for (int h = 0; h < group; h++) {
            const float *src = q + (int64_t)(row_begin + r) * q_row_stride +
                               (int64_t)(kv_head * group + h) * head_dim;
            float *dst = qs + (int64_t)(r * group + h) * head_dim;
            for (int d = 0; d < head_dim; d += 8) store8(dst + d, load8(src + d) * vscale);
            stacks[r * group + h].depth = 0;
            stacks[r * group + h].acc = stack_acc + (int64_t)(r * group + h) * MAX_LEVELS * head_dim;
        }

    const int last = positions[row_end - 1];
    for (int c0 = 0; c0 <= last; c0 += CHUNK) {
        int first_row = 0; /* rows before it have no keys in this chunk */
        while (positions[row_begin + first_row] < c0) first_row++;
        const int c1 = c0 + CHUNK <= last + 1 ? c0 + CHUNK : last + 1;
        /* Each key's slot, walking the block table (no division per key). The rows are
         * scattered over the pool, block by block, which the hardware prefetchers do
         * not follow: fetch this chunk's values (read after the scores) and the next
         * chunk's keys ahead of use. */
        int block = c0 / block_size, offset = c0 % block_size;
        for (int l = c0; l < c1; l++) {
            int64_t slot = (int64_t)block_table[block] * block_size + offset;
            keys[l - c0] = k_head + slot * head_dim;
            values[l - c0] = v_head + slot * head_dim;
            prefetch_row(values[l - c0], head_dim);
            if (++offset == block_size) offset = 0, block++;
        }
        const int next_end = c1 + CHUNK <= last + 1 ? c1 + CHUNK : last + 1;
        for (int l = c1; l < next_end; l++) {
            int64_t slot = (int64_t)block_table[block] * block_size + offset;
            prefetch_row(k_head + slot * head_dim, head_dim);
            if (++offset == block_size) offset = 0, block++;
        }

        for (int r = first_row; r < rows; r++) {
            const int n = (positions[row_begin + r] < c1 - 1 ? positions[row_begin + r] + 1 : c1) - c0;
            float maxes[16], sums[16];
            for (int h = 0; h < group; h++) {
                const int pair = r * group + h;
                const float *qv = qs + (int64_t)pair * head_dim;
                float *w = scores + pair * CHUNK;
                /* scores: eight keys per lane_sums8, the tail one by one (same tree) */
                int i = 0;
                for (; i + 8 <= n; i += 8) {
                    v8sf dots[8]; /* eight independent chains, each dot_lanes' order */
                    for (int j = 0; j < 8; j++) dots[j] = load8(qv) * load8(keys[i + j]);
                    for (int d = 8; d < head_dim; d += 8) {
                        v8sf qd = load8(qv + d);
                        for (int j = 0; j < 8; j++) dots[j] += qd * load8(keys[i + j] + d);
                    }
                    store8(w + i, lane_sums8(dots));
                }
                for (; i < n; i++) w[i] = lane_sum(dot_lanes(qv, keys[i], head_dim));

                v8sf vmax = splat(-INFINITY); /* max is exact in any order */
                for (i = 0; i + 8 <= n; i += 8) {
                    v8sf x = load8(w + i);
                    vmax = blend(x > vmax, x, vmax);
                }
                float m = vmax[0];
                for (int j = 1; j < 8; j++) m = vmax[j] > m ? vmax[j] : m;
                for (; i < n; i++) m = w[i] > m ? w[i] : m;
                v8sf vm = splat(m), total = splat(0.0f);
                for (i = 0; i < n; i += 8) {
                    v8sf e = exp_v8(load8(w + i) - vm);
                    if (n - i < 8) { /* keys past the row's position weigh exactly 0 */
                        v8si lane = {0, 1, 2, 3, 4, 5, 6, 7};
                        e = blend(lane < n - i, e, splat(0.0f));
                    }
                    store8(w + i, e);
                    total += e;
                }
                maxes[h] = m;
                sums[h] = lane_sum(total);
            }
            /* acc = sum over keys (in order) of w_l * v_l, for the row's heads at once */
            float *w = scores + r * group * CHUNK, *a = acc + (int64_t)r * group * head_dim;
            accumulate(w, values, n, a, group, head_dim);
            for (int h = 0; h < group; h++)
                push(&stacks[r * group + h], maxes[h], sums[h], a + (int64_t)h * head_dim,
                     head_dim);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < group; h++)
            finish(&stacks[r * group + h],
                   out + (int64_t)(row_begin + r) * out_row_stride +
                       (int64_t)(kv_head * group + h) * head_dim,
                   head_dim);
}

int llmesh__attention_tiles(const int32_t *row_seq, int num_rows, int *tile_start) {
    int num_tiles = 0;
    for (int r = 0; r < num_rows;) {
        int end = r + 1;
        while (end < num_rows && end - r < TILE && row_seq[end] == row_seq[r]) end++;
        tile_start[num_tiles++] = r;
        r = end;
    }
    tile_start[num_tiles] = num_rows;
    return num_tiles;
}

/* This thread's scratch for tiles of `group` query heads per KV head: queries, weights,
 * chunk sums and partial stacks of TILE rows. NULL when out of memory. */
static float *attention_scratch(int group, int head_dim) {
    const int64_t pairs = (int64_t)TILE * group;
    return thread_scratch(pairs * (2 * head_dim + CHUNK + (int64_t)MAX_LEVELS * head_dim));
}

int llmesh__attention_reserve(int group, int head_dim) {
    return attention_scratch(group, head_dim) ? 0 : -2;
}

/* The (tile, KV head) items of llmesh_paged_attention, for the threads of the enclosing
 * region (kernels.h); tiles from llmesh__attention_tiles. */
int llmesh__attention_for(const float *q, int64_t q_row_stride, const float *k_cache,
                          const float *v_cache, int64_t pool_slots, int block_size,
                          const int32_t *block_tables, int64_t table_stride,
                          const int32_t *row_seq, const int32_t *positions,
                          const int *tile_start, int num_tiles, float *out,
                          int64_t out_row_stride, int num_heads, int num_kv_heads, int head_dim,
                          float scale) {
    const int group = num_heads / num_kv_heads;
    float *scratch = attention_scratch(group, head_dim);
    const int64_t num_items = (int64_t)num_tiles * num_kv_heads;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_items; item++) {
        if (!scratch) continue;
        int tile = (int)(item / num_kv_heads), kv_head = (int)(item % num_kv_heads);
        int begin = tile_start[tile], end = tile_start[tile + 1];
        attend_tile(q, q_row_stride, k_cache, v_cache, pool_slots, block_size,
                    block_tables + (int64_t)row_seq[begin] * table_stride, positions, begin, end,
                    out, out_row_stride, kv_head, group, head_dim, scale, scratch);
    }
    return scratch ? 0 : -2;
}

/* q: row r, query head h at q + r * q_row_stride + h * head_dim (float32).
 * k_cache, v_cache: (num_kv_heads, pool_slots, head_dim) float32, slot = block * bs + offset.
 * block_tables: (num_seqs, table_stride) int32. row_seq, positions: (num_rows,) int32;
 * a sequence's rows are adjacent with ascending positions, and every key up to a row's
 * position is already in the pool.
 * out: row r, head h at out + r * out_row_stride + h * head_dim.
 * Returns 0, or -1 when head_dim or the group size is unsupported, -2 on no memory. */
int llmesh_paged_attention(const float *q, int64_t q_row_stride, const float *k_cache,
                           const float *v_cache, int64_t pool_slots, int block_size,
                           const int32_t *block_tables, int64_t table_stride,
                           const int32_t *row_seq, const int32_t *positions, int num_rows,
                           float *out, int64_t out_row_stride, int num_heads, int num_kv_heads,
                           int head_dim, float scale, int num_threads) {
    if (num_kv_heads <= 0 || head_dim % 8 != 0) return -1;
    const int group = num_heads / num_kv_heads;
    if (group > 16 || group * num_kv_heads != num_heads) return -1;
    if (num_rows <= 0) return 0;

    int *tile_start = malloc(sizeof(int) * (num_rows + 1));
    if (!tile_start) return -2;
    const int num_tiles = llmesh__attention_tiles(row_seq, num_rows, tile_start);
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && (int64_t)num_tiles * num_kv_heads > 1)
    {
        if (llmesh__attention_for(q, q_row_stride, k_cache, v_cache, pool_slots, block_size,
                                  block_tables, table_stride, row_seq, positions, tile_start,
                                  num_tiles, out, out_row_stride, num_heads, num_kv_heads,
                                  head_dim, scale)) {
#pragma omp atomic write
            failed = 1;
        }
    }
    free(tile_start);
    return failed ? -2 : 0;
}
