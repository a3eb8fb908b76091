/* y = x @ W^T (+ bias) for float32 on CPU (W: out_features x in_features, row-major,
 * as torch keeps it).
 *
 *   for each panel of 16 output columns (threads split the panels):
 *       for each block of KC inputs:
 *           the (KC, 16) panel: packed once by llmesh_pack_weight, or else transposed
 *           from W[cols, block] into L1 now (8 x 8 register transposes)
 *           for each 6 rows of x: 12 accumulators (6 rows x 2 vectors of 8 columns),
 *               acc += broadcast(x[row][k]) * panel[k]   for k in the block, in order
 *
 * Every output element is one chain of adds in k order, then the bias:
 * y[m][n] = ((0 + x[m][0] w[n][0]) + x[m][1] w[n][1]) + ... + bias[n]. Nothing about it
 * depends on the other rows, their number, the tiling or the threads, so the op is
 * batch-invariant by construction (no padding to 16 rows, unlike MKL's gemm paths).
 */

#include <stdint.h>

#include "kernels.h"
#include "vec.h"

#define NR 16  /* output columns per panel: two vectors */
#define MR 6   /* rows per micro-tile: 12 accumulators + 2 panel vectors + 1 broadcast */
#define KC 256 /* inputs per panel block: 16 KiB of panel */

/* 8 x 8 transpose: t[j] lane i = r[i] lane j. */
static inline void transpose8(const v8sf r[8], v8sf t[8]) {
    const v8si lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
    const v8si lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8si lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    v8sf a[8], b[8];
    for (int i = 0; i < 4; i++) { /* rows 2i, 2i+1 interleaved: columns 0,1|4,5 and 2,3|6,7 */
        a[2 * i] = __builtin_shuffle(r[2 * i], r[2 * i + 1], lo1);
        a[2 * i + 1] = __builtin_shuffle(r[2 * i], r[2 * i + 1], hi1);
    }
    for (int i = 0; i < 2; i++) /* four rows: column c of rows 4i..4i+3 | column c + 4 */
        for (int h = 0; h < 2; h++) {
            b[4 * i + 2 * h] = __builtin_shuffle(a[4 * i + h], a[4 * i + 2 + h], lo2);
            b[4 * i + 2 * h + 1] = __builtin_shuffle(a[4 * i + h], a[4 * i + 2 + h], hi2);
        }
    for (int j = 0; j < 4; j++) {
        t[j] = __builtin_shuffle(b[j], b[4 + j], lo4);
        t[4 + j] = __builtin_shuffle(b[j], b[4 + j], hi4);
    }
}

/* panel[kk][0..16) = W[c0 .. c0 + 16)[k0 + kk] for kk < kc (columns >= n are zero). */
static void pack_panel(const float *w, int k, int n, int c0, int k0, int kc, float *panel) {
    for (int kk = 0; kk < kc; kk += 8) {
        if (kk % 16 == 0) /* the next panel's rows, a cache line each, while this one runs */
            for (int i = 0; i < NR && c0 + NR + i < n; i++)
                __builtin_prefetch(w + (int64_t)(c0 + NR + i) * k + k0 + kk);
        for (int half = 0; half < 2; half++) {
            v8sf r[8], t[8];
            for (int i = 0; i < 8; i++) {
                int c = c0 + 8 * half + i;
                r[i] = c < n ? load8(w + (int64_t)c * k + k0 + kk) : splat(0.0f);
            }
            transpose8(r, t);
            for (int j = 0; j < 8; j++) store8(panel + (kk + j) * NR + 8 * half, t[j]);
        }
    }
}

/* acc (rows x 16, row stride NR) += x[rows][k0 .. k0 + kc) @ panel, MR_ rows at a time. */
static inline __attribute__((always_inline)) void micro(const float *x, int64_t x_stride,
                                                        const float *panel, int kc, float *acc,
                                                        const int MR_) {
    v8sf c[MR][2];
    for (int i = 0; i < MR_; i++) {
        c[i][0] = load8(acc + i * NR);
        c[i][1] = load8(acc + i * NR + 8);
    }
    for (int kk = 0; kk < kc; kk++) {
        v8sf b0 = load8(panel + kk * NR), b1 = load8(panel + kk * NR + 8);
        for (int i = 0; i < MR_; i++) {
            v8sf a = splat(x[i * x_stride + kk]);
            c[i][0] += a * b0;
            c[i][1] += a * b1;
        }
    }
    for (int i = 0; i < MR_; i++) {
        store8(acc + i * NR, c[i][0]);
        store8(acc + i * NR + 8, c[i][1]);
    }
}

static void micro_rows(const float *x, int64_t x_stride, const float *panel, int kc, float *acc,
                       int rows) {
    switch (rows) {
    case 6: micro(x, x_stride, panel, kc, acc, 6); break;
    case 5: micro(x, x_stride, panel, kc, acc, 5); break;
    case 4: micro(x, x_stride, panel, kc, acc, 4); break;
    case 3: micro(x, x_stride, panel, kc, acc, 3); break;
    case 2: micro(x, x_stride, panel, kc, acc, 2); break;
    default: micro(x, x_stride, panel, kc, acc, 1); break;
    }
}

/* This thread's scratch: panel (KC x 16) | accumulators (rows x 16). NULL when out of
 * memory. */
static float *linear_scratch(int64_t rows) { return thread_scratch((int64_t)KC * NR + rows * NR); }

int llmesh__linear_reserve(int64_t rows) { return linear_scratch(rows) ? 0 : -2; }

/* The panel loop of y = x @ W^T (+ bias), for the threads of the enclosing region (see
 * kernels.h). W is either row-major (w: (n, k)), packed here panel by panel, or already
 * packed by llmesh_pack_weight (packed: (ceil(n / 16), k, 16)); exactly one of w and
 * packed is given. x: (rows, k), row stride x_stride; bias: (n,) or NULL; out: (rows,
 * n), row stride out_stride. k must be a multiple of 8. Both forms give the same bits.
 * Returns 0, or -2 when this thread is out of memory. */
int llmesh__linear_for(const float *x, int64_t x_stride, int64_t rows, int k, const float *w,
                       const float *packed, int n, const float *bias, float *out,
                       int64_t out_stride) {
    const int num_panels = (n + NR - 1) / NR;
    float *scratch = linear_scratch(rows);
#pragma omp for schedule(static)
    for (int p = 0; p < num_panels; p++) {
        if (!scratch) continue;
        float *acc = scratch + KC * NR;
        const int c0 = p * NR;
        for (int64_t i = 0; i < rows * NR; i += 8) store8(acc + i, splat(0.0f));
        for (int k0 = 0; k0 < k; k0 += KC) {
            const int kc = k - k0 < KC ? k - k0 : KC;
            const float *panel = scratch;
            if (packed)
                panel = packed + ((int64_t)p * k + k0) * NR;
            else
                pack_panel(w, k, n, c0, k0, kc, scratch);
            for (int64_t r0 = 0; r0 < rows; r0 += MR) {
                const int mr = rows - r0 < MR ? (int)(rows - r0) : MR;
                micro_rows(x + r0 * x_stride + k0, x_stride, panel, kc, acc + r0 * NR, mr);
            }
        }
        const int width = n - c0 < NR ? n - c0 : NR;
        for (int64_t r = 0; r < rows; r++)
            for (int j = 0; j < width; j++) {
                float y = acc[r * NR + j];
                out[r * out_stride + c0 + j] = bias ? y + bias[c0 + j] : y;
            }
    }
    return scratch ? 0 : -2;
}

static int linear(const float *x, int64_t x_stride, int64_t rows, int k, const float *w,
                  const float *packed, int n, const float *bias, float *out, int64_t out_stride,
                  int num_threads) {
    const int num_panels = (n + NR - 1) / NR;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && num_panels > 1 && rows * (int64_t)n * k >= (1 << 18))
    {
        if (llmesh__linear_for(x, x_stride, rows, k, w, packed, n, bias, out, out_stride)) {
#pragma omp atomic write
            failed = 1;
        }
    }
    return failed ? -2 : 0;
}

int llmesh_linear(const float *x, int64_t x_stride, int64_t rows, int k, const float *w, int n,
                  const float *bias, float *out, int64_t out_stride, int num_threads) {
    return linear(x, x_stride, rows, k, w, NULL, n, bias, out, out_stride, num_threads);
}

int llmesh_linear_packed(const float *x, int64_t x_stride, int64_t rows, int k,
                         const float *packed, int n, const float *bias, float *out,
                         int64_t out_stride, int num_threads) {
    return linear(x, x_stride, rows, k, NULL, packed, n, bias, out, out_stride, num_threads);
}

/* packed (ceil(n / 16), k, 16) = W (n, k) panel by panel (columns past n are zero), the
 * layout llmesh_linear builds per call: packing once at load saves reading and
 * transposing every weight on every step. */
void llmesh_pack_weight(const float *w, int n, int k, float *packed, int num_threads) {
    const int num_panels = (n + NR - 1) / NR;
#pragma omp parallel for num_threads(num_threads)
    for (int p = 0; p < num_panels; p++)
        pack_panel(w, k, n, p * NR, 0, k, packed + (int64_t)p * k * NR);
}
