/* Helpers shared by the kernels. Vectors: GCC vector extensions, 8 float32 lanes (AVX2
 * registers where the machine has them, pairs of SSE registers elsewhere). Every vector
 * helper is a fixed sequence of IEEE operations, so results do not depend on the
 * instruction set (the kernels are built with -ffp-contract=off, no -ffast-math). */

#ifndef LLMESH_VEC_H
#define LLMESH_VEC_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8sf __attribute__((vector_size(32)));
typedef int32_t v8si __attribute__((vector_size(32)));

static inline v8sf splat(float x) { return (v8sf){x, x, x, x, x, x, x, x}; }

static inline v8sf load8(const float *p) {
    v8sf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8sf v) { memcpy(p, &v, sizeof v); }

/* The one tree every kernel sums a vector's lanes with. */
static inline float lane_sum(v8sf v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

static inline v8sf blend(v8si mask, v8sf if_true, v8sf if_false) {
    return (v8sf)((mask & (v8si)if_true) | (~mask & (v8si)if_false));
}

/* exp (Cephes expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n), about 1 ulp.
 * Below -87.3 (2^-126) it returns 0; above 88.72 infinity. */
static inline v8sf exp_v8(v8sf x) {
    const v8sf lo = splat(-87.33654f), hi = splat(88.72283935546875f);
    v8si underflow = x < lo;
    x = blend(underflow, lo, x);
    x = blend(x > hi, hi, x);
    v8sf t = x * splat(1.44269504088896341f) + splat(0.5f);
    v8si n = __builtin_convertvector(t, v8si); /* truncates: floor for t >= 0 */
    n = n + (__builtin_convertvector(n, v8sf) > t); /* true is -1: floor for t < 0 */
    v8sf nf = __builtin_convertvector(n, v8sf);
    v8sf r = x - nf * splat(0.693359375f);
    r = r - nf * splat(-2.12194440e-4f);
    v8sf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * (r * r) + r + splat(1.0f);
    v8si bits = (n + 127) << 23; /* n = 128 (x at hi) gives infinity's bits */
    return blend(underflow, splat(0.0f), p * (v8sf)bits);
}

/* A per-thread buffer kept across calls (OpenMP threads live as long as the process):
 * allocating one per call would map and fault in fresh pages every time. Each source
 * file including this gets its own. NULL when out of memory. */
static inline float *thread_scratch(int64_t num_floats) {
    static __thread float *buffer = NULL;
    static __thread int64_t capacity = 0;
    if (num_floats > capacity) {
        float *grown = realloc(buffer, sizeof(float) * num_floats);
        if (!grown) return NULL;
        buffer = grown;
        capacity = num_floats;
    }
    return buffer;
}

#endif
