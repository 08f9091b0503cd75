/* tpk ops: the float32 elementwise and attention steps of a Llama layer, fused so that a
 * decode step makes a handful of C calls per layer instead of dozens of numpy calls.
 *
 * Written once in portable C with GCC vector extensions (8 floats: two SSE or NEON
 * registers, one AVX register). Sums over a vector use a fixed pattern (8 partial sums
 * in lane order, then a fixed tree), so the result does not depend on the machine or on
 * the number of threads. These are not part of the bit-exact matmul contract; they are
 * checked against numpy/float64 to a tolerance (tests/test_ops.py).
 */
#include "tpk_impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* 32-byte vectors by value, only between always-inline helpers of this file */
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define INLINE static inline __attribute__((always_inline))

/* x86-64 Linux: also an AVX2 build of the hot loops, picked by the loader (ifunc). The
 * arithmetic is written lane by lane, so both builds give the same bits. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define TPK_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TPK_CLONES
#endif

INLINE v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

INLINE v8f splat8(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

INLINE float hsum8(v8f v) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

INLINE float hmax8(v8f v) {
    float m = v[0];
    for (int i = 1; i < 8; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* dot product with 8 partial sums (the tail, n % 8, in lanes 0..): same bits everywhere */
INLINE float dot8(const float *a, const float *b, int64_t n) {
    v8f acc = splat8(0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = acc + load8(a + i) * load8(b + i);
    for (int l = 0; i < n; i++, l++) acc[l] = acc[l] + a[i] * b[i];
    return hsum8(acc);
}

INLINE v8f vmin8(v8f a, v8f b) {
    const v8i m = (v8i)(a < b);
    return (v8f)((m & (v8i)a) | (~m & (v8i)b));
}

INLINE v8f vmax8(v8f a, v8f b) {
    const v8i m = (v8i)(a > b);
    return (v8f)((m & (v8i)a) | (~m & (v8i)b));
}

/* exp of 8 floats (Cephes expf: 2^n * polynomial, about 1 ulp; inputs clamped to
 * [-87.3, 88.37], so large negative arguments give ~1e-38 rather than 0). */
INLINE v8f exp8(v8f x) {
    x = vmin8(x, splat8(88.3762626647949f));
    x = vmax8(x, splat8(-87.3365478515625f));
    v8f fx = x * splat8(1.44269504088896341f) + splat8(0.5f);
    v8i ti = __builtin_convertvector(fx, v8i);             /* truncation */
    v8f tf = __builtin_convertvector(ti, v8f);
    v8i gt = (v8i)(tf > fx);                                /* floor for negatives */
    ti = ti + gt;                                           /* gt is -1 where true */
    tf = __builtin_convertvector(ti, v8f);
    x = x - tf * splat8(0.693359375f);
    x = x - tf * splat8(-2.12194440e-4f);
    const v8f z = x * x;
    v8f y = splat8(1.9875691500E-4f);
    y = y * x + splat8(1.3981999507E-3f);
    y = y * x + splat8(8.3334519073E-3f);
    y = y * x + splat8(4.1665795894E-2f);
    y = y * x + splat8(1.6666665459E-1f);
    y = y * x + splat8(5.0000001201E-1f);
    y = y * z + x + splat8(1.0f);
    const v8i pow2n = (ti + 127) << 23;
    return y * (v8f)pow2n;
}

static float expf8(float x) {   /* one lane of exp8, for tails */
    v8f v = splat8(x);
    return exp8(v)[0];
}

static int threads_for(int nthreads, double work, double min_work) {
    if (nthreads < 1) return 1;
    return work >= min_work ? nthreads : 1;
}

/* ---------------------------------------------------------------- rmsnorm */

TPK_CLONES void tpk_rmsnorm(const float *x, const float *w, float *y, int64_t T, int64_t n, float eps, int nthreads) {
    const int nt = threads_for(nthreads, (double)T * n, 65536.0);
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * n;
        float *yr = y + t * n;
        double ss = 0.0;
        v8f acc = splat8(0.0f);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {   /* 8 partial float sums per 8 x 64 elements, then double */
            const v8f v = load8(xr + i);
            acc = acc + v * v;
            if (((i >> 3) & 63) == 63) {
                ss += hsum8(acc);
                acc = splat8(0.0f);
            }
        }
        ss += hsum8(acc);
        for (; i < n; i++) ss += (double)xr[i] * xr[i];
        const float scale = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
        i = 0;
        const v8f s = splat8(scale);
        for (; i + 8 <= n; i += 8) store8(yr + i, load8(xr + i) * s * load8(w + i));
        for (; i < n; i++) yr[i] = xr[i] * scale * w[i];
    }
}

/* ---------------------------------------------------------------- rope */

void tpk_rope(float *x, int64_t T, int64_t heads, int64_t hd, const float *cos_t, const float *sin_t) {
    const int64_t half = hd / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (t * heads + h) * hd;
            for (int64_t i = 0; i < half; i++) {
                const float x0 = v[2 * i], x1 = v[2 * i + 1];
                v[2 * i] = x0 * c[i] - x1 * s[i];
                v[2 * i + 1] = x0 * s[i] + x1 * c[i];
            }
        }
    }
}

/* ---------------------------------------------------------------- silu(g) * u */

TPK_CLONES void tpk_silu_mul(const float *g, const float *u, float *out, int64_t n, int nthreads) {
    const int nt = threads_for(nthreads, (double)n, 131072.0);
    const int64_t chunks = (n + 1023) / 1024;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (int64_t ch = 0; ch < chunks; ch++) {
        const int64_t end = (ch + 1) * 1024 < n ? (ch + 1) * 1024 : n;
        int64_t i = ch * 1024;
        for (; i + 8 <= end; i += 8) {
            const v8f gv = load8(g + i);
            store8(out + i, gv / (splat8(1.0f) + exp8(-gv)) * load8(u + i));
        }
        for (; i < end; i++) out[i] = g[i] / (1.0f + expf8(-g[i])) * u[i];
    }
}

/* ---------------------------------------------------------------- attention over the KV cache */

/* The heads h0..h0+nh-1 that share one kv head, at one position (keys 0..n-1): scores,
 * softmax and the weighted sum of values. Each key and value row is read once for all the
 * heads of the group. Per head the arithmetic is the same whatever the grouping. */
TPK_CLONES static void attend_group(const float *q, int64_t nh, const float *K, const float *V, int64_t n,
                                    int64_t hd, float scale, float *scores, float *acc, float *out) {
    for (int64_t j = 0; j < n; j++) {
        const float *kj = K + j * hd;
        for (int64_t h = 0; h < nh; h++) scores[h * n + j] = dot8(q + h * hd, kj, hd) * scale;
    }
    for (int64_t h = 0; h < nh; h++) {
        float *s = scores + h * n;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
        v8f sum8 = splat8(0.0f);
        int64_t j = 0;
        const v8f m = splat8(mx);
        for (; j + 8 <= n; j += 8) {
            const v8f e = exp8(load8(s + j) - m);
            store8(s + j, e);
            sum8 = sum8 + e;
        }
        for (int l = 0; j < n; j++, l++) {
            s[j] = expf8(s[j] - mx);
            sum8[l] = sum8[l] + s[j];
        }
        const float inv = 1.0f / hsum8(sum8);
        for (j = 0; j < n; j++) s[j] = s[j] * inv;     /* probabilities */
    }
    const int64_t hd8 = hd / 8 * 8;
    memset(acc, 0, sizeof(float) * (size_t)(nh * hd));
    for (int64_t j = 0; j < n; j++) {
        const float *vj = V + j * hd;
        for (int64_t h = 0; h < nh; h++) {
            const v8f p = splat8(scores[h * n + j]);
            float *a = acc + h * hd;
            for (int64_t d = 0; d < hd8; d += 8) store8(a + d, load8(a + d) + p * load8(vj + d));
            for (int64_t d = hd8; d < hd; d++) a[d] = a[d] + p[0] * vj[d];
        }
    }
    memcpy(out, acc, sizeof(float) * (size_t)(nh * hd));
}

void tpk_attention(const float *q, const float *k, const float *v, int64_t T, int64_t n_heads, int64_t n_kv,
                   int64_t hd, const int32_t *kv_of_head, float *kcache, float *vcache, int64_t ctx,
                   int64_t start, int64_t window, float scale, float *out, int nthreads) {
    /* store the new keys and values: k, v are (T, n_kv, hd), the caches (n_kv, ctx, hd) */
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < n_kv; h++) {
            memcpy(kcache + (h * ctx + start + t) * hd, k + (t * n_kv + h) * hd, hd * sizeof(float));
            memcpy(vcache + (h * ctx + start + t) * hd, v + (t * n_kv + h) * hd, hd * sizeof(float));
        }
    /* work units: (position, run of consecutive query heads reading the same kv head) */
    int64_t runs = 0;
    for (int64_t h = 0; h < n_heads; h++)
        if (h == 0 || kv_of_head[h] != kv_of_head[h - 1]) runs++;
    int64_t *run_start = (int64_t *)malloc(sizeof(int64_t) * (size_t)(runs + 1));
    runs = 0;
    for (int64_t h = 0; h < n_heads; h++)
        if (h == 0 || kv_of_head[h] != kv_of_head[h - 1]) run_start[runs++] = h;
    run_start[runs] = n_heads;
    int64_t widest = 0;
    for (int64_t r = 0; r < runs; r++)
        if (run_start[r + 1] - run_start[r] > widest) widest = run_start[r + 1] - run_start[r];
    const int64_t units = T * runs;
    const int nt = threads_for(nthreads, (double)n_heads * T * (start + T) * hd, 32768.0);
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(widest * (start + T) + 8));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(widest * hd + 8));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t u = 0; u < units; u++) {
            const int64_t t = u / runs, r = u % runs;
            const int64_t h0 = run_start[r], nh = run_start[r + 1] - h0, kv = kv_of_head[h0];
            /* keys first..start+t: every earlier position, or the last `window` with a sliding window */
            const int64_t first = window > 0 && start + t + 1 > window ? start + t + 1 - window : 0;
            attend_group(q + (t * n_heads + h0) * hd, nh, kcache + (kv * ctx + first) * hd,
                         vcache + (kv * ctx + first) * hd, start + t + 1 - first, hd, scale, scores, acc,
                         out + (t * n_heads + h0) * hd);
        }
        free(scores);
        free(acc);
    }
    free(run_start);
}
